"""A jinja2 sandbox whose renders are bounded in time, size, work and nesting.

jinja2's ``ImmutableSandboxedEnvironment`` keeps a template away from Python's internals and from
mutating its inputs, but not from spinning or exhausting memory: two nested loops over
``range(100000)`` run for hours, ``'x' * 10**10`` allocates 10 GB, a macro that calls itself twice
doubles its output at every level. A chat template comes from a model file and the server renders it
for every request, so a template is hostile input: every render here runs under a budget.

- **Steps and time.** Every loop iteration, call, filter and intercepted operator is a step; the
  render stops after ``Limits.max_steps`` steps or ``Limits.seconds`` of wall time (the clock is read
  every 32 steps, and while a big value is measured).
  Templates are rewritten after parsing so that each ``for`` loop iterates through ``_loop_items``
  (one step per item): a loop with an empty body is counted too.
- **Size.** No value an operation creates may stand for more than ``Limits.max_chars`` characters
  (``_measure``: the length of a string; for a container, its items and their own sizes, with shared
  references counted every time, as ``str()`` would write them). Operations whose result size the
  template controls through an argument -- ``*``, ``**``, ``%``, ``~``, ``+``, ``str.format`` widths,
  ``center``/``ljust``/``zfill``/``expandtabs``/``replace``/``join``/``translate`` and the filters
  ``center``, ``indent``, ``format``, ``batch``, ``slice``, ``replace``, ``wordwrap``, ``join``,
  ``sum``, ``tojson``, ``pprint`` -- are checked *before* they run, so nothing large is ever
  allocated; every other result is checked after. Output is capped at ``max_chars`` too.
- **Work.** The sizes of all values created and written (each ``{{ }}``, and each pass of a loop
  body's template text) add up to at most ``Limits.max_work``: a loop that builds and drops big
  strings stops, and so does a macro or ``{% set %}`` block whose output would be joined into one
  huge string.
- **Nesting.** Calls (macros, ``caller()``, recursive loops) nest at most ``Limits.max_depth`` deep.

Anything over budget raises ``BudgetExceeded``; the caller turns it into its own error.
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
import itertools
import re
import string
import time
import types
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.filters import make_attrgetter
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from jinja2.visitor import NodeTransformer

MAX_INT_BITS = 1 << 16       # ints beyond this many bits are not needed by any chat template
MAX_COUNT = 1 << 16          # batch sizes, slice counts


@dataclass(frozen=True)
class Limits:
    """What one render may spend. The defaults leave real chat templates orders of magnitude of room."""

    seconds: float = 1.0
    max_steps: int = 2_000_000
    max_chars: int = 4 << 20     # the output, and any single value
    max_work: int = 64 << 20     # the sizes of all values created, added up
    max_depth: int = 64


class BudgetExceeded(Exception):
    """A render went over its ``Limits``; the message says which."""


class _Budget:
    __slots__ = ("deadline", "depth", "limits", "steps", "work")

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.deadline = time.monotonic() + limits.seconds
        self.steps = self.work = self.depth = 0

    def step(self) -> None:
        self.steps += 1
        if self.steps & 31:
            return  # the clock is read every 32 steps: a step is small, and reading it costs as much
        if self.steps > self.limits.max_steps:
            raise BudgetExceeded(
                f"it took more than {self.limits.max_steps} steps (loop iterations and calls)"
            )
        self.clock()

    def clock(self) -> None:
        if time.monotonic() > self.deadline:
            raise BudgetExceeded(f"it ran for more than {self.limits.seconds:g} s")

    def size(self, n: int, what: str) -> None:
        if n > self.limits.max_chars:
            raise BudgetExceeded(f"{what} would be {n if n < 1 << 62 else 'astronomically'} characters long "
                                 f"(at most {self.limits.max_chars})")

    def weigh(self, value: Any, what: str) -> int:
        n = len(value) + 1 if type(value) is str else _measure(value, self.limits.max_chars, self)[0]
        self.size(n, what)
        return n

    def account(self, value: Any, what: str) -> None:
        self.work += self.weigh(value, what)
        if self.work > self.limits.max_work:
            raise BudgetExceeded(f"it created more than {self.limits.max_work} characters of values in all")


_CURRENT: ContextVar[_Budget | None] = ContextVar("pipx_llama_template_budget", default=None)


def _budget() -> _Budget:
    # outside render() (jinja2 folds constant filter calls while compiling) the default limits apply
    return _CURRENT.get() or _Budget(Limits())


_SCALARS = frozenset({int, float, bool, type(None)})


def _measure(value: Any, limit: int, budget: _Budget | None = None) -> tuple[int, int]:
    """(size, depth) of ``value`` as text: a string's length; 1 per item of a container plus the items'
    own sizes (a reference repeated n times counts n times, as ``str()`` repeats it). Stops once the
    size passes ``limit``, so the cost is at most about ``limit`` visits however big the value; with a
    ``budget``, its clock is checked every 4096 visits."""
    total = depth = visits = 0
    stack: list[Iterator[Any]] = [iter((value,))]
    while stack:
        for v in stack[-1]:
            total += 1
            visits += 1
            t = type(v)
            child: Iterable[Any] | None = None
            if t is str:
                total += len(v)
            elif t in _SCALARS:
                pass
            elif t is list or t is tuple:
                kinds = set(map(type, v))  # lists of numbers or of strings are measured at C speed
                if kinds <= _SCALARS:
                    total += len(v)
                elif kinds == {str}:
                    total += len(v) + sum(map(len, v))
                else:
                    child = v
            elif t is dict:
                child = v.items()
            elif isinstance(v, str):
                total += len(v)
            elif isinstance(v, (bytes, bytearray)):
                total += 4 * len(v)
            elif isinstance(v, range):
                total += 8 * len(v)
            elif isinstance(v, collections.abc.Mapping):
                child = v.items()
            elif isinstance(v, (list, tuple, set, frozenset, collections.abc.MappingView)):
                child = v
            elif isinstance(v, Namespace):
                child = object.__getattribute__(v, "_Namespace__attrs").items()
            if total > limit:
                return total, max(depth, len(stack))
            if budget is not None and not visits & 0xFFF:
                budget.clock()
            if child is not None:
                stack.append(iter(child))
                depth = max(depth, len(stack))
                break
        else:
            stack.pop()
    return total, depth


# --- operators ----------------------------------------------------------------------------------------------

_PERCENT = re.compile(r"%(?:\([^)]*\))?[#0 +-]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.)", re.DOTALL)


def _check_percent_format(budget: _Budget, fmt: str, args: Any) -> None:
    for width, precision, _ in _PERCENT.findall(fmt):
        if "*" in (width, precision):
            raise BudgetExceeded("'%' formatting with a '*' width or precision is not allowed in a template")
        for n in (width, precision):
            if n:
                budget.size(int(n), "a '%' formatted field")
    budget.weigh(args, "the values of a '%' format")


def _check_format_spec(budget: _Budget, fmt: str) -> None:
    for _, _, spec, _ in string.Formatter().parse(fmt):
        if spec and "{" in spec:
            raise BudgetExceeded("nested replacement fields in a format spec are not allowed in a template")
        for n in re.findall(r"\d+", spec or ""):
            budget.size(int(n), "a formatted field")


def _check_binop(budget: _Budget, op: str, left: Any, right: Any) -> None:
    ints = isinstance(left, int) and isinstance(right, int)
    if op == "*":
        if ints:
            if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise BudgetExceeded(f"a product of integers would exceed {MAX_INT_BITS} bits")
            return
        seq, n = (left, right) if isinstance(right, int) else (right, left)
        if isinstance(n, int) and isinstance(seq, (str, list, tuple)):
            unit = len(seq) if isinstance(seq, str) else budget.weigh(seq, "a repeated value")
            budget.size(unit * max(0, n), "a repeated value")
    elif op == "**":
        if ints and right > 0 and abs(left) > 1 and left.bit_length() * right > MAX_INT_BITS:
            raise BudgetExceeded(f"a power of integers would exceed {MAX_INT_BITS} bits")
    elif op == "+":
        if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            budget.size(budget.weigh(left, "a concatenation") + budget.weigh(right, "a concatenation"),
                        "a concatenation")
    elif op == "%" and isinstance(left, str):
        _check_percent_format(budget, left, right)


# --- str methods whose result size an argument decides ------------------------------------------------------

def _method_width(budget: _Budget, s: str, width: Any = 0, *rest: Any) -> None:
    if isinstance(width, int):
        budget.size(max(len(s), width), "a padded string")


def _method_expandtabs(budget: _Budget, s: str, tabsize: Any = 8) -> None:
    if isinstance(tabsize, int):
        budget.size(len(s) + s.count("\t") * max(0, tabsize), "a string with expanded tabs")


def _method_replace(budget: _Budget, s: str, old: Any = "", new: Any = "", count: Any = -1) -> None:
    if isinstance(old, str) and isinstance(new, str) and isinstance(count, int):
        n = s.count(old) if old else len(s) + 1
        n = min(n, count) if count >= 0 else n
        budget.size(len(s) + n * max(0, len(new) - len(old)), "a string after replace")


def _method_translate(budget: _Budget, s: str, table: Any = None) -> None:
    if isinstance(table, collections.abc.Mapping):
        longest = max((len(v) if isinstance(v, str) else 1 for v in table.values()), default=1)
        budget.size(len(s) * longest, "a translated string")


_STR_METHODS: dict[str, Callable[..., None]] = {
    "center": _method_width, "ljust": _method_width, "rjust": _method_width, "zfill": _method_width,
    "expandtabs": _method_expandtabs, "replace": _method_replace, "translate": _method_translate,
}


def _joined(budget: _Budget, sep: str, items: list[Any], what: str) -> None:
    budget.size(sum(budget.weigh(x, what) for x in items) + len(sep) * max(0, len(items) - 1), what)


# --- filters ------------------------------------------------------------------------------------------------

Bound = dict[str, Any]


def _f_center(budget: _Budget, a: Bound) -> None:
    _method_width(budget, str(a["value"]), a.get("width", 80))


def _f_indent(budget: _Budget, a: Bound) -> None:
    s, width = str(a["s"]), a.get("width", 4)
    w = width if isinstance(width, int) else len(str(width))
    budget.size(len(s) + (s.count("\n") + 1) * max(0, w), "an indented string")


def _f_format(budget: _Budget, a: Bound) -> None:
    _check_percent_format(budget, str(a["value"]), (a.get("args"), a.get("kwargs")))


def _f_count(key: str) -> Callable[[_Budget, Bound], None]:
    def check(budget: _Budget, a: Bound) -> None:
        n = a.get(key)
        if isinstance(n, int) and n > MAX_COUNT:
            raise BudgetExceeded(f"{key} {n} is more than {MAX_COUNT}")
    return check


def _f_replace(budget: _Budget, a: Bound) -> None:
    count = a.get("count")
    _method_replace(budget, str(a["s"]), a["old"], a["new"], -1 if count is None else count)


def _f_wordwrap(budget: _Budget, a: Bound) -> None:
    s, width = str(a["s"]), a.get("width", 79)
    wrap = a.get("wrapstring") or a["environment"].newline_sequence
    if isinstance(width, int):
        budget.size(len(s) + (len(s) // max(1, width) + 1) * len(str(wrap)), "a wrapped string")


def _f_join(budget: _Budget, a: Bound) -> None:
    items = list(a["value"])
    a["value"] = items
    attribute = a.get("attribute")
    if attribute is not None:
        get = make_attrgetter(a["eval_ctx"].environment, attribute)
        items = [get(x) for x in items]
    _joined(budget, str(a.get("d", "")), items, "a joined string")


def _f_sum(budget: _Budget, a: Bound) -> Any:
    items = list(a["iterable"])
    attribute = a.get("attribute")
    if attribute is not None:
        get = make_attrgetter(a["environment"], attribute)
        items = [get(x) for x in items]
    total = a.get("start", 0)
    if all(isinstance(x, (int, float)) for x in (total, *items)):
        a["iterable"], a["attribute"] = items, None
        return None
    size = budget.weigh(total, "the start of sum")
    for x in items:  # adding sequences: a step each, every partial sum checked before it is made
        budget.step()
        size += budget.weigh(x, "an item of sum")
        budget.size(size, "a sum")
    if type(total) in (list, tuple) and all(type(x) is type(total) for x in items):
        return type(total)(itertools.chain(total, *items))  # what sum() gives, without its quadratic copying
    for x in items:
        total = total + x
    return total


def _f_tojson(budget: _Budget, a: Bound) -> None:
    indent = a.get("indent")
    width = indent if isinstance(indent, int) else len(indent) if isinstance(indent, str) else 0
    if width > 64:
        raise BudgetExceeded(f"tojson indent {width} is more than 64")
    size, depth = _measure(a["x"] if "x" in a else a.get("value"), budget.limits.max_chars, budget)
    budget.size(6 * size * (1 + max(0, width) * depth), "a JSON text")


def _f_pprint(budget: _Budget, a: Bound) -> None:
    size, depth = _measure(a["value"], budget.limits.max_chars, budget)
    budget.size(size * (1 + depth), "a pretty-printed value")


# A check may rewrite the bound arguments (``join`` lists its input once), or return the result itself.
_FILTER_CHECKS: dict[str, Callable[[_Budget, Bound], Any]] = {
    "center": _f_center,
    "indent": _f_indent,
    "format": _f_format,
    "batch": _f_count("linecount"),
    "slice": _f_count("slices"),
    "replace": _f_replace,
    "wordwrap": _f_wordwrap,
    "join": _f_join,
    "sum": _f_sum,
    "tojson": _f_tojson,
    "pprint": _f_pprint,
}
# urlize multiplies each URL by its attribute arguments and no chat template uses it
_FILTERS_REMOVED = ("urlize",)


def _guard_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    check = _FILTER_CHECKS.get(name)
    skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0
    signature = inspect.signature(func) if check is not None else None
    # jinja2 passes the context/environment first; an async-variant filter's signature (that of the
    # function it wraps) may not list it, and then it is kept out of the binding
    prefix = skip if signature is not None and skip and next(iter(signature.parameters), "") not in (
        "context", "eval_ctx", "environment") else 0

    @functools.wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.step()
        for v in (*args[skip:], *kwargs.values()):
            budget.weigh(v, f"the input of the {name} filter")
        if signature is not None and check is not None:
            try:
                bound = signature.bind(*args[prefix:], **kwargs)
            except TypeError as err:
                raise TypeError(f"{name} filter: {err}") from None
            arguments: Bound = dict(bound.arguments)
            for p in signature.parameters.values():  # var-positional/keyword arrive packed
                if p.kind is p.VAR_POSITIONAL:
                    arguments.setdefault(p.name, ())
                elif p.kind is p.VAR_KEYWORD:
                    arguments.setdefault(p.name, {})
            done = check(budget, arguments)
            if done is not None:
                result = done
            else:
                bound.arguments.update(arguments)
                result = func(*args[:prefix], *bound.args, **bound.kwargs)
        else:
            result = func(*args, **kwargs)
        budget.account(result, f"the result of the {name} filter")
        return result

    return guarded


# --- the environment ----------------------------------------------------------------------------------------


def _loop_items(iterable: Any, body_chars: int) -> Iterator[Any]:
    """What a ``for`` loop iterates: the same items, one step each, each accounted for the template text
    its body writes (``{{ }}`` values are accounted by ``_finalize``)."""
    budget = _budget()
    for item in iterable:
        budget.step()
        budget.work += body_chars
        if budget.work > budget.limits.max_work:
            raise BudgetExceeded(f"it wrote more than {budget.limits.max_work} characters in all")
        yield item


def _concat(parts: list[Any]) -> str:
    """The ``~`` operator, size checked before the string is made."""
    budget = _budget()
    budget.step()
    budget.size(sum(budget.weigh(p, "a '~' concatenation") for p in parts), "a '~' concatenation")
    return "".join(str(p) for p in parts)


def _finalize(value: Any) -> Any:
    """Every ``{{ expression }}``: its text may not exceed the size limit, and counts as work (a macro's
    or a ``{% set %}`` block's output is joined in one piece before anything else sees it)."""
    budget = _CURRENT.get() or _budget()
    if type(value) is str and len(value) <= budget.limits.max_chars:
        budget.work += len(value)
    else:
        budget.account(value, "an output value")
    return value


def _text_in(node: nodes.Node) -> int:
    """Characters of template text in ``node`` outside nested loops (those account for their own)."""
    n = len(node.data) if isinstance(node, nodes.TemplateData) else 0
    return n + sum(_text_in(child) for child in node.iter_child_nodes() if not isinstance(child, nodes.For))


class _Instrument(NodeTransformer):
    """Rewrites a parsed template: loops iterate through ``_loop_items``, ``~`` goes through ``_concat``."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        body = sum(_text_in(child) for child in node.body)
        node.iter = nodes.Call(nodes.ImportedName(f"{__name__}._loop_items"), [node.iter, nodes.Const(body)],
                               [], None, None).set_lineno(node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return nodes.Call(nodes.ImportedName(f"{__name__}._concat"), [nodes.List(node.nodes)],
                          [], None, None).set_lineno(node.lineno)


class BudgetedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox with every render budgeted (see the module docstring).

    Filters added after construction are guarded by ``compile()``; use it (not ``from_string``).
    """

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, **options: Any) -> None:
        super().__init__(finalize=_finalize, **options)
        self.globals.pop("lipsum", None)  # lorem ipsum of any length; no template needs it
        for name in _FILTERS_REMOVED:
            self.filters.pop(name, None)

    def compile_template(self, source: str) -> jinja2.Template:
        for name, func in list(self.filters.items()):
            if not getattr(func, "_pipx_guarded", False):
                guarded = _guard_filter(name, func)
                guarded._pipx_guarded = True  # type: ignore[attr-defined]
                self.filters[name] = guarded
        tree = _Instrument().visit(self.parse(source))
        tree.set_environment(self)
        return self.from_string(tree)

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.step()
        if isinstance(obj, types.BuiltinMethodType) and isinstance(obj.__self__, str):
            if obj.__name__ in _STR_METHODS:
                _STR_METHODS[obj.__name__](budget, obj.__self__, *args, *kwargs.values())
            elif obj.__name__ == "join" and args:
                items = list(args[0])
                _joined(budget, obj.__self__, items, "a joined string")
                args = (items, *args[1:])
        budget.depth += 1
        try:
            if budget.depth > budget.limits.max_depth:
                raise BudgetExceeded(
                    f"calls (macros, recursive loops) nest more than {budget.limits.max_depth} deep"
                )
            result = super().call(context, obj, *args, **kwargs)
        finally:
            budget.depth -= 1
        budget.account(result, "a call's result")
        return result

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _CURRENT.get() or _budget()
        if operator == "+" and type(left) is str and type(right) is str:
            # the common case, kept cheap: at most twice the size of values already checked
            n = len(left) + len(right)
            if n > budget.limits.max_chars:
                budget.size(n, "a concatenation")
            budget.work += n
            return left + right
        budget.step()
        _check_binop(budget, operator, left, right)
        result = super().call_binop(context, operator, left, right)
        budget.account(result, f"the result of '{operator}'")
        return result

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt = value.__self__

        def guarded(*args: Any, **kwargs: Any) -> str:
            budget = _budget()
            _check_format_spec(budget, fmt)
            budget.weigh((args, kwargs), "the values of str.format")
            return wrapped(*args, **kwargs)

        return guarded


def render(template: jinja2.Template, context: dict[str, Any], limits: Limits) -> str:
    """Render ``template`` (compiled by a ``BudgetedEnvironment``) within ``limits``."""
    budget = _Budget(limits)
    token = _CURRENT.set(budget)
    gen = template.generate(**context)
    try:
        out: list[str] = []
        size = 0
        for chunk in gen:
            size += len(chunk)
            if size > limits.max_chars:
                raise BudgetExceeded(f"its output would be more than {limits.max_chars} characters long")
            out.append(chunk)
        return "".join(out)
    finally:
        gen.close()
        _CURRENT.reset(token)
