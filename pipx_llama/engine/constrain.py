"""Constrained decoding: a grammar that masks the logits token by token, so the output always matches it.

A JSON schema (OpenAI's ``response_format``, Ollama's ``format``, a tool's parameters) or a Lark grammar
(a tool call in a model's own syntax, with ``%json`` for its arguments) is compiled by llguidance,
the library llama.cpp also links for this. Before each token, ``Constraint.apply`` sets the logits of
every token the grammar cannot continue with to -inf; after the sampler's choice, ``Constraint.accept``
advances it. Once the grammar is complete only the end-of-generation tokens remain allowed, so the
generation ends there.

Why llguidance (README, "Structured outputs", has the numbers): one abi3 wheel per platform with no
Python dependencies (xgrammar needs torch and transformers), a schema compiles in milliseconds even on
a 152k vocabulary (outlines-core builds a full token index per schema: seconds), the widest JSON schema
coverage of the three, and an unsupported keyword is refused instead of silently ignored.

The vocabulary comes from our own ``Tokenizer``: each token's bytes (llama.cpp's ``token_to_piece``),
control tokens marked with a leading 0xFF byte as llguidance's llama.cpp adapter marks them (so plain
text never produces them; a grammar names them as ``<[id]>``), and the end-of-generation ids. It is
built once per tokenizer (about a second for 152k tokens) and shared by every request.

A ``Constraint`` belongs to one sequence; a scheduler that batches sequences calls ``apply`` and
``accept`` for each of them. Resource use is bounded: schemas are refused past ``MAX_GRAMMAR_CHARS``,
and llguidance's parser limits (``LIMITS``) cap grammar size, lexer states and the work of each step,
so a hostile schema is an error, never a stalled or exhausted process.
"""

from __future__ import annotations

import json
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import llguidance as llg
import numpy as np
from numba import njit

from pipx_llama.errors import UsageError
from pipx_llama.tokenizer.tokenizer import ATTR_CONTROL, ATTR_USER_DEFINED, Tokenizer

MAX_GRAMMAR_CHARS = 256 << 10  # a schema of a few hundred properties is ~20 KB; this bounds compile time
# llguidance's defaults, tightened where a request could otherwise take seconds or hundreds of MB
LIMITS = llg.LLParserLimits(
    max_grammar_size=200_000,
    max_lexer_states=50_000,  # ~1-2 kB each
    initial_lexer_fuel=1_000_000,  # ~20 ms
    step_lexer_fuel=200_000,  # ~15 ms per token at most
    step_max_items=50_000,
    max_items_in_row=2_000,
    verbose_errors=False,  # error texts go back to the client: no grammar dumps
)
# compact, deterministic JSON: one space after ',' and ':' as models write it, no other whitespace
# (free whitespace lets a small model emit newlines until max_tokens)
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_HINT = "simplify the schema, or check it against the JSON Schema specification"


class GrammarError(UsageError):
    """A schema or grammar that cannot constrain generation (invalid, unsupported, too large, unsatisfiable).

    ``param`` names the request field it came from, for the server's 400.
    """

    def __init__(self, message: str, hint: str = _HINT, *, param: str | None = None) -> None:
        super().__init__(message, hint)
        self.param = param


@dataclass(frozen=True)
class Vocabulary:
    """llguidance's view of one tokenizer: token bytes, control tokens marked, end-of-generation ids."""

    lltokenizer: llg.LLTokenizer
    n_vocab: int
    eog: tuple[int, ...]


_VOCABS: weakref.WeakKeyDictionary[Tokenizer, Vocabulary] = weakref.WeakKeyDictionary()
_VOCAB_LOCK = threading.Lock()


def token_bytes(tok: Tokenizer) -> list[bytes]:
    """Each token's bytes as llguidance wants them; control tokens (and ``<...>`` added tokens) start 0xFF."""
    out = []
    for i in range(tok.n_vocab):
        piece = tok.token_to_piece(i, special=True)
        attr = tok.token_attr(i)
        special = bool(attr & ATTR_CONTROL) or (
            bool(attr & ATTR_USER_DEFINED) and piece.startswith(b"<") and piece.endswith(b">"))
        out.append(b"\xff" + piece if special else piece)
    return out


class _Wrapper(llg.TokenizerWrapper):
    """The duck-typed tokenizer ``LLTokenizer`` reads (it calls it to tokenize text it forces)."""

    def __init__(self, tok: Tokenizer, tokens: list[bytes], eos: int) -> None:  # no super(): it wraps HF's
        self.eos_token_id = eos
        self.bos_token_id = tok.bos_id
        self.tokens = tokens
        self.special_token_ids = [i for i, t in enumerate(tokens) if t.startswith(b"\xff")]
        self.is_tokenizer_wrapper = True
        self._tok = tok

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return self._tok.encode(text, add_special=False, parse_special=False)


def vocabulary(tok: Tokenizer) -> Vocabulary:
    """The tokenizer's llguidance vocabulary, built on first use and cached with the tokenizer."""
    with _VOCAB_LOCK:
        found = _VOCABS.get(tok)
        if found is None:
            eog = tuple(sorted(tok.stop_ids))
            if not eog:
                raise GrammarError(f"{tok.source}: the vocabulary has no end-of-generation token",
                                   "constrained output needs a model that can end its answer")
            eos = tok.eos_id if tok.eos_id in eog else eog[0]
            wrapper = _Wrapper(tok, token_bytes(tok), eos)
            lltok = llg.LLTokenizer(wrapper, n_vocab=tok.n_vocab, eos_token=list(eog))
            found = _VOCABS[tok] = Vocabulary(lltok, tok.n_vocab, eog)
        return found


def json_schema_grammar(schema: Any, *, param: str) -> str:
    """A grammar for JSON documents valid under ``schema`` (a dict, or ``True`` for any JSON value)."""
    if schema is True:
        schema = {}
    if not isinstance(schema, dict):
        raise GrammarError(f"'{param}' must be a JSON schema object", param=param)
    if "x-guidance" in schema:  # llguidance's own options (whitespace, leniency) are the server's to set
        raise GrammarError(f"'{param}' must not contain 'x-guidance'", "remove that key from the schema",
                           param=param)
    _check_size(schema, param)
    schema = {**schema, "x-guidance": JSON_OPTIONS}
    try:
        return llg.LLMatcher.grammar_from_json_schema(schema)
    except ValueError as err:
        raise GrammarError(f"'{param}' is not a usable JSON schema: {_cut(err)}", param=param) from None


def lark_grammar(text: str, *, param: str) -> str:
    """A grammar from llguidance's Lark syntax (``%json {...}`` embeds a JSON schema)."""
    if len(text) > MAX_GRAMMAR_CHARS:
        raise GrammarError(f"'{param}' makes a grammar of {len(text)} characters; at most "
                           f"{MAX_GRAMMAR_CHARS} are allowed", param=param)
    return llg.LLMatcher.grammar_from_lark(text)


def json_in_lark(schema: dict[str, Any]) -> str:
    """``schema`` as a Lark ``%json`` rule body, with this module's JSON formatting."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS}, ensure_ascii=False)


def _check_size(schema: Any, param: str) -> None:
    try:
        n = len(json.dumps(schema, ensure_ascii=False))
    except (TypeError, ValueError, RecursionError):
        raise GrammarError(f"'{param}' is not a JSON value, or nests too deeply", param=param) from None
    if n > MAX_GRAMMAR_CHARS:
        raise GrammarError(f"'{param}' is {n} characters of JSON; at most {MAX_GRAMMAR_CHARS} are allowed",
                           param=param)


def _cut(text: object, limit: int = 300) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


class Constraint:
    """One sequence's grammar state: masks logits, follows the sampled tokens."""

    def __init__(self, grammar: str, tok: Tokenizer, *, param: str | None = None) -> None:
        self.vocab = vocabulary(tok)
        self.param = param
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self.vocab.lltokenizer,
                                                                          limits=LIMITS)
        if is_error:
            raise GrammarError(f"'{param}' cannot constrain the output: {_cut(messages[0])}", param=param)
        self._matcher = llg.LLMatcher(self.vocab.lltokenizer, grammar, log_level=0, limits=LIMITS)
        self._bits = np.zeros((self.vocab.n_vocab + 31) // 32, dtype=np.int32)
        self._fresh = False  # whether _bits holds the mask of the current state
        self.allowed()  # the first step catches grammars llguidance accepts but cannot start (unsatisfiable)

    def _check(self) -> None:
        if self._matcher.is_error():
            problem = _cut(self._matcher.get_error())
            raise GrammarError(f"'{self.param}' cannot constrain the output: {problem}", param=self.param)

    def _mask(self) -> np.ndarray:
        """The current state's bitmask (bit ``i`` of word ``i // 32``: token ``i`` may come next)."""
        if not self._fresh:
            self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
            self._check()
            if not self._bits.any():
                raise GrammarError(f"'{self.param}' cannot be satisfied: no token can continue the output",
                                   param=self.param)
            self._fresh = True
        return self._bits

    def allowed(self) -> np.ndarray:
        """Which token ids may come next (bool, one per vocabulary entry)."""
        bits = np.unpackbits(self._mask().view(np.uint8), bitorder="little")[: self.vocab.n_vocab]
        return bits.astype(bool)

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """A copy of ``logits`` (float32) with every token the grammar forbids at -inf."""
        out = np.empty(logits.shape[0], dtype=np.float32)
        mask_logits(np.ascontiguousarray(logits, dtype=np.float32), self._mask(), self.vocab.n_vocab, out)
        return out

    def accept(self, token: int) -> None:
        """Advance past ``token`` (one that ``apply`` allowed)."""
        self._fresh = False
        if not self._matcher.consume_token(int(token)):
            raise GrammarError(f"token {token} does not continue the output '{self.param}' allows: "
                               f"{_cut(self._matcher.get_error())}", param=self.param)

    @property
    def accepting(self) -> bool:
        """Whether the output so far is complete under the grammar."""
        return self._matcher.is_accepting()


@njit(cache=True, nogil=True)
def mask_logits(logits: np.ndarray, words: np.ndarray, n: int, out: np.ndarray) -> None:
    """``out[i] = logits[i]`` where bit ``i`` of ``words`` is set (``i < n``), else -inf.

    Word by word: most words of a grammar's mask are 0. numpy's masked select costs ~1 ms per token
    on a 152k vocabulary; this, a tenth of that.
    """
    m = out.shape[0]
    out[:] = -np.inf
    for w in range(words.shape[0]):
        word = words[w]
        if word == 0:
            continue
        base = w * 32
        for b in range(32):
            i = base + b
            if i >= n or i >= m:
                break
            if (word >> b) & 1:
                out[i] = logits[i]


def mask_logits_ref(logits: np.ndarray, words: np.ndarray, n: int) -> np.ndarray:
    """``mask_logits``' numpy twin."""
    allowed = np.zeros(logits.shape[0], dtype=bool)
    m = min(n, logits.shape[0])
    allowed[:m] = np.unpackbits(words.view(np.uint8), bitorder="little")[:m].astype(bool)
    return np.where(allowed, logits, -np.inf).astype(np.float32)
