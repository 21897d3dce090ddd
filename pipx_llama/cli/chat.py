"""The interactive chat: a REPL over one model and one context, with slash commands.

Input comes from a ``TerminalReader`` (prompt_toolkit: line editing, history, multi-line editing) when
both ends are a terminal, else from a ``PlainReader`` (one message per line, for scripts). A message is
multi-line while its last line ends with a backslash, or while a block opened by ``\"\"\"`` at its start
is not closed; Alt-Enter (Esc then Enter) also inserts a newline in a terminal.

Answers stream to ``out`` token by token: on a terminal rendered as Markdown and word-wrapped
(``cli/markdown_stream.py``), elsewhere as plain text. A prompt that takes over a second to evaluate shows
a spinner with its tokens done / total on ``err`` (``cli/liveness.py``). Ctrl-C during an answer stops
it between two tokens and keeps the session (a second Ctrl-C stops at once); Ctrl-D at the prompt
leaves. When the conversation no longer fits the context, the oldest exchanges are dropped with a
notice before the next answer; an answer that fills the context is cut, with a notice. Notices go to
``err``, never to ``out``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TextIO

from pipx_llama.cli.liveness import Activity
from pipx_llama.cli.markdown_stream import MarkdownStream
from pipx_llama.engine import Context, Generation, Model, SamplerConfig, generate
from pipx_llama.errors import ChatTemplateError, ContextFullError, PipxLlamaError, UsageError

PROMPT = "> "
CONTINUATION = "… "
BLOCK = '"""'

HELP = """\
Type a message and press Enter. Commands:
  /help                 this help
  /reset                forget the conversation (the system prompt stays)
  /system [TEXT]        show or set the system prompt ('/system -' removes it)
  /set [NAME VALUE]     show the settings, or set temp, top_p, top_k, min_p, repeat_penalty,
                        max_tokens (-1 = until the model ends its turn) or seed ('none' = random)
  /save FILE            save the conversation: FILE.json as JSON, any other name as Markdown
  /exit                 leave (also /quit, or Ctrl-D)
Multi-line: end a line with \\ to go on, or open a block with \"\"\" and close it with \"\"\";
Alt-Enter inserts a newline. Start a message with // to send a text beginning with /.
Ctrl-C stops an answer (the conversation stays); Ctrl-C at the prompt clears the line."""

# /set NAME -> (SamplerConfig field or "max_tokens", parser)
_SETTINGS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "temp": ("temperature", float),
    "top_p": ("top_p", float),
    "top_k": ("top_k", int),
    "min_p": ("min_p", float),
    "repeat_penalty": ("repeat_penalty", float),
    "max_tokens": ("max_tokens", int),
    "seed": ("seed", lambda v: None if v.lower() in ("none", "random", "-") else int(v)),
}
_ALIASES = {"temperature": "temp", "top-p": "top_p", "top-k": "top_k", "min-p": "min_p",
            "repeat-penalty": "repeat_penalty", "max-tokens": "max_tokens", "n": "max_tokens",
            "n_predict": "max_tokens"}


# --- input --------------------------------------------------------------------------------------------------


def needs_more(text: str) -> bool:
    """True while a message is unfinished: a block opened by \"\"\" at its start and not yet closed, or
    a last line ending with a backslash."""
    s = text.lstrip()
    if s.startswith(BLOCK):
        body = s.rstrip()
        return not (len(body) >= 2 * len(BLOCK) and body.endswith(BLOCK))
    return text.endswith("\\")


def finish_input(text: str) -> str:
    """The message a finished input stands for: a \"\"\" block without its quotes, backslash-newlines
    as newlines."""
    s = text.strip()
    if s.startswith(BLOCK) and len(s) >= 2 * len(BLOCK) and s.endswith(BLOCK):
        return s[len(BLOCK) : -len(BLOCK)].strip("\n")
    return text.replace("\\\n", "\n")


class LineReader(Protocol):
    def read(self) -> str:
        """One whole message; raises EOFError at the end of input, KeyboardInterrupt on Ctrl-C."""
        ...


class PlainReader:
    """Messages from a stream, a line each (continued by ``needs_more``); prompts only if asked to."""

    def __init__(self, stream: TextIO | None = None, prompts: TextIO | None = None) -> None:
        self.stream = stream or sys.stdin
        self.prompts = prompts

    def _line(self, prompt: str) -> str:
        if self.prompts is not None:
            self.prompts.write(prompt)
            self.prompts.flush()
        line = self.stream.readline()
        if not line:
            raise EOFError
        return line.rstrip("\r\n")

    def read(self) -> str:
        text = self._line(PROMPT)
        while needs_more(text):
            try:
                text += "\n" + self._line(CONTINUATION)
            except EOFError:
                break
        return finish_input(text)


class TerminalReader:
    """prompt_toolkit: line editing, history (kept in ``history_file`` when given), multi-line editing."""

    def __init__(self, history_file: Path | None, color: bool) -> None:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.formatted_text import FormattedText
        from prompt_toolkit.history import FileHistory, InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings
        from prompt_toolkit.output.color_depth import ColorDepth

        kb = KeyBindings()

        @kb.add("enter")
        def _enter(event: Any) -> None:
            buf = event.current_buffer
            if needs_more(buf.text):
                buf.insert_text("\n")
            else:
                buf.validate_and_handle()

        @kb.add("escape", "enter")
        def _newline(event: Any) -> None:
            event.current_buffer.insert_text("\n")

        history: Any = InMemoryHistory()
        if history_file is not None:
            try:
                history_file.parent.mkdir(parents=True, exist_ok=True)
                history = FileHistory(str(history_file))
            except OSError:
                pass  # an unwritable state dir costs the history, not the chat
        self._prompt = FormattedText([("bold ansigreen" if color else "", PROMPT)])
        self._session = PromptSession(
            history=history, key_bindings=kb, multiline=True,
            prompt_continuation=lambda width, line_number, is_soft_wrap: CONTINUATION.rjust(width),
            color_depth=ColorDepth.DEPTH_8_BIT if color else ColorDepth.MONOCHROME,
            enable_open_in_editor=False,
        )

    def read(self) -> str:
        return finish_input(self._session.prompt(self._prompt))


def history_path() -> Path | None:
    """Where typed messages are kept between sessions: ``PIPX_LLAMA_HISTORY`` (a file; empty or 'off'
    turns it off), else the user state dir."""
    value = os.environ.get("PIPX_LLAMA_HISTORY")
    if value is not None:
        return None if value.strip().lower() in ("", "off", "0", "no") else Path(value).expanduser()
    import platformdirs

    return Path(platformdirs.user_state_dir("pipx-llama")) / "chat-history"


def make_reader(color: bool) -> LineReader:
    """The terminal reader when stdin and stdout are terminals, else plain lines from stdin (prompted on
    stderr when a person types them, so that a redirected stdout holds only the answers)."""
    if sys.stdin.isatty() and sys.stdout.isatty():
        try:
            return TerminalReader(history_path(), color)
        except Exception:  # noqa: BLE001  (an odd terminal prompt_toolkit cannot drive: plain input still works)
            return PlainReader(sys.stdin, sys.stdout)
    return PlainReader(sys.stdin, sys.stderr if sys.stdin.isatty() else None)


# --- Ctrl-C during an answer --------------------------------------------------------------------------------


class StopOnInterrupt:
    """While active, the first Ctrl-C only sets ``stopped`` (the answer ends after the current token);
    a second one raises KeyboardInterrupt at once."""

    def __init__(self) -> None:
        self.stopped = False
        self._previous: Any = None
        self._installed = False

    def _handler(self, signum: int, frame: Any) -> None:
        if self.stopped:
            raise KeyboardInterrupt
        self.stopped = True

    def __enter__(self) -> StopOnInterrupt:  # noqa: PYI034
        self.stopped = False
        try:
            self._previous = signal.signal(signal.SIGINT, self._handler)
            self._installed = True
        except ValueError:  # not the main thread: Ctrl-C keeps its default meaning
            self._installed = False
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)


# --- the session --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Turn:
    """What one answer produced: its text, the generation (stats) and how it ended."""

    text: str
    generation: Generation | None
    finish: str  # stop | length | cancelled | context-full | error


class Notices:
    """Lines for the user on ``err`` (dim on a colour terminal); never mixed into the answers."""

    def __init__(self, err: TextIO, color: bool) -> None:
        from rich.console import Console

        # force_terminal=False: without colour, no escape sequence at all (not even dim or bold)
        self.console = Console(
            file=err, highlight=False, no_color=not color, soft_wrap=True, force_terminal=color
        )

    def info(self, text: str) -> None:
        self.console.print(text, style="dim", markup=False)

    def warn(self, text: str) -> None:
        self.console.print(text, style="yellow", markup=False)

    def error(self, err: PipxLlamaError) -> None:
        self.console.print(f"error: {err.message}", style="red", markup=False)
        if err.hint:
            self.console.print(f"hint: {err.hint}", style="dim", markup=False)


class _PlainWriter:
    """The answer as it comes, ending with a newline (for pipes and files)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.text = ""

    def write(self, piece: str) -> None:
        self.text += piece
        self.out.write(piece)
        self.out.flush()

    def finish(self) -> None:
        if self.text and not self.text.endswith("\n"):
            self.out.write("\n")


class ChatSession:
    """One conversation with ``model`` in ``ctx``: messages, settings, slash commands, answers."""

    def __init__(
        self,
        model: Model,
        ctx: Context,
        *,
        sampler: SamplerConfig,
        max_tokens: int = -1,
        system: str | None = None,
        stop: Sequence[str] = (),
        verbose: bool = False,
        name: str = "model",
        out: TextIO | None = None,
        err: TextIO | None = None,
        color: bool = False,
    ) -> None:
        self.model = model
        self.ctx = ctx
        self.sampler = sampler
        self.max_tokens = max_tokens
        self.system = system or None
        self.stop = tuple(stop)
        self.verbose = verbose
        self.name = name
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.color = color
        self.notices = Notices(self.err, color)
        self.messages: list[dict[str, str]] = []  # user/assistant turns; the system prompt is kept apart

    # conversation ---------------------------------------------------------------------------------------

    def conversation(self) -> list[dict[str, str]]:
        """The messages as the template sees them: the system prompt first, when there is one."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages

    def _prompt_ids(self) -> list[int]:
        tok = self.model.tokenizer
        text = tok.chat_prompt(self.conversation(), add_generation_prompt=True)
        return tok.encode(text, add_special=True, parse_special=True)

    def _answer_room(self) -> int:
        """Tokens kept free for the answer when deciding whether old exchanges must go."""
        n_ctx = self.ctx.n_ctx
        wanted = self.max_tokens if self.max_tokens >= 0 else n_ctx // 4
        return min(wanted, n_ctx // 2)

    def _fitted_prompt(self) -> list[int]:
        """The prompt for the next answer, dropping the oldest exchanges (with a notice) until it fits."""
        n_ctx, room = self.ctx.n_ctx, self._answer_room()
        dropped = 0
        while True:
            ids = self._prompt_ids()
            if len(ids) + room <= n_ctx:
                break
            if len(self.messages) <= 1:
                if len(ids) < n_ctx:
                    break  # only the new message is left: answer in what room there is
                raise ContextFullError(
                    f"the message is {len(ids)} tokens with the chat template; the context holds {n_ctx}",
                    "send a shorter message, or start again with a larger -c/--ctx-size",
                )
            del self.messages[:2]  # the oldest user message and its answer
            dropped += 1
        if dropped:
            self.notices.warn(
                f"[context full: dropped the {dropped} oldest exchange{'s' if dropped > 1 else ''} to make "
                f"room (the context holds {n_ctx} tokens); /reset starts afresh]")
        return ids

    def ask(self, text: str) -> Turn:
        """Answer ``text`` as the next user message, streaming the answer to ``out``."""
        self.messages.append({"role": "user", "content": text})
        try:
            ids = self._fitted_prompt()
            gen = generate(self.ctx, ids, max_tokens=self.max_tokens, sampler=self.sampler, stop=self.stop)
        except (ContextFullError, ChatTemplateError, UsageError) as err:
            self.messages.pop()
            self.notices.error(err)
            return Turn("", None, "error")
        finish = self._stream(gen)
        answer = gen.text
        if finish == "cancelled" and not answer.strip():
            self.messages.pop()  # nothing was said: forget the question too, the user may ask again
        else:
            self.messages.append({"role": "assistant", "content": answer})
        if self.verbose:
            self._report(gen)
        return Turn(answer, gen, finish)

    def _writer(self) -> MarkdownStream | _PlainWriter:
        """Markdown on a terminal (unless TERM=dumb), the text as it comes elsewhere."""
        if self.out.isatty() and os.environ.get("TERM") != "dumb":
            return MarkdownStream(self.out, color=self.color)
        return _PlainWriter(self.out)

    def _stream(self, gen: Generation) -> str:
        out = self.out
        finish = "stop"
        writer = self._writer()
        busy = Activity(self.err, "processing the prompt")
        it = iter(gen)
        with StopOnInterrupt() as guard, busy:

            def on_prompt(done: int, total: int) -> None:
                busy.update(done, total)
                if guard.stopped:  # Ctrl-C while a long prompt is evaluated: stop after this batch
                    raise KeyboardInterrupt

            gen.on_prompt = on_prompt
            try:
                for piece in it:
                    busy.stop()
                    if piece.text:
                        writer.write(piece.text)
                    if guard.stopped:
                        break
                finish = "cancelled" if guard.stopped else (gen.stats.finish_reason or "stop")
            except KeyboardInterrupt:
                finish = "cancelled"
                # the forward pass may have been cut short: keep only what the cache really holds
                self.ctx.truncate(min(self.ctx.n_past, len(self.ctx.tokens)))
            except ContextFullError:
                finish = "context-full"
            finally:
                it.close()  # type: ignore[attr-defined]
                busy.stop()
                writer.finish()
        out.flush()
        if finish == "cancelled":
            self.notices.info("[stopped]")
        elif finish == "context-full":
            self.notices.warn(
                f"[context full: the answer was cut after {gen.stats.n_generated} tokens; older "
                "exchanges will be dropped to make room, or /reset starts afresh]"
            )
        elif finish == "length":
            self.notices.info(f"[max_tokens reached ({self.max_tokens}); /set max_tokens N to change it]")
        return finish

    def _report(self, gen: Generation) -> None:
        """Timings after an answer, in llama.cpp's words."""
        s = gen.stats
        p_ms, g_ms = s.prompt_seconds * 1000, s.generation_seconds * 1000
        per_p = p_ms / s.n_prompt_evaluated if s.n_prompt_evaluated else 0.0
        per_g = g_ms / s.n_generated if s.n_generated else 0.0
        self.notices.info(
            f"prompt eval time = {p_ms:10.2f} ms / {s.n_prompt_evaluated:5d} tokens "
            f"({per_p:8.2f} ms per token, {s.prompt_tokens_per_second:8.2f} tokens per second)\n"
            f"       eval time = {g_ms:10.2f} ms / {s.n_generated:5d} tokens "
            f"({per_g:8.2f} ms per token, {s.generation_tokens_per_second:8.2f} tokens per second)\n"
            f"         context = {self.ctx.n_past} / {self.ctx.n_ctx} tokens "
            f"({s.n_prompt - s.n_prompt_evaluated} reused from the cache)"
        )

    # commands -------------------------------------------------------------------------------------------

    def handle(self, text: str) -> bool:
        """Act on one input (message or command); False when the session should end."""
        if not text.strip():
            return True
        stripped = text.strip()
        if stripped.startswith("//"):
            self.ask(text.lstrip()[1:])
            return True
        if stripped.startswith("/"):
            return self.command(stripped)
        self.ask(text)
        return True

    def command(self, line: str) -> bool:
        name, _, rest = line[1:].partition(" ")
        name, rest = name.lower(), rest.strip()
        if name in ("exit", "quit", "bye"):
            return False
        if name in ("help", "?"):
            self.notices.console.print(HELP, markup=False)
        elif name in ("reset", "clear"):
            self.reset()
            self.notices.info("[conversation cleared]")
        elif name == "system":
            self._system(rest)
        elif name == "set":
            self._set(rest)
        elif name == "save":
            self._save(rest)
        else:
            self.notices.error(
                UsageError(
                    f"unknown command /{name}",
                    "/help lists the commands; start with // to send a text beginning with /",
                )
            )
        return True

    def reset(self) -> None:
        self.messages.clear()

    def recover(self) -> None:
        """After an interruption at any point of a turn: no unanswered question, a consistent cache."""
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()
        self.ctx.truncate(min(self.ctx.n_past, len(self.ctx.tokens)))

    def _system(self, rest: str) -> None:
        if not rest:
            self.notices.info(f"system prompt: {self.system!r}" if self.system else "no system prompt")
            return
        self.system = None if rest == "-" else rest
        self.notices.info("[system prompt removed]" if self.system is None else "[system prompt set]")

    def settings(self) -> dict[str, Any]:
        c = self.sampler
        return {"temp": c.temperature, "top_p": c.top_p, "top_k": c.top_k, "min_p": c.min_p,
                "repeat_penalty": c.repeat_penalty, "max_tokens": self.max_tokens, "seed": c.seed}

    def _set(self, rest: str) -> None:
        parts = rest.split()
        if not parts:
            self.notices.info("  ".join(f"{k} {v}" for k, v in self.settings().items()))
            return
        key = _ALIASES.get(parts[0].lower(), parts[0].lower())
        if key not in _SETTINGS:
            self.notices.error(UsageError(f"unknown setting {parts[0]!r}", "one of: " + ", ".join(_SETTINGS)))
            return
        if len(parts) != 2:
            self.notices.error(
                UsageError(f"/set {key} takes one value", f"e.g. /set {key} {self.settings()[key]}")
            )
            return
        field, parse = _SETTINGS[key]
        try:
            value = parse(parts[1])
        except ValueError:
            self.notices.error(UsageError(f"/set {key}: {parts[1]!r} is not a valid value",
                                          f"e.g. /set {key} {self.settings()[key]}"))
            return
        if field == "max_tokens":
            if value < -1 or value == 0:
                self.notices.error(UsageError(f"max_tokens must be -1 or positive, got {value}",
                                              "-1 answers until the model ends its turn"))
                return
            self.max_tokens = value
        else:
            candidate = dataclasses.replace(self.sampler, **{field: value})
            try:
                candidate.validate()
            except UsageError as err:
                self.notices.error(UsageError(err.message, "/set shows the current settings"))
                return
            self.sampler = candidate
        self.notices.info(f"[{key} = {value}]")

    def _save(self, rest: str) -> None:
        if not rest:
            self.notices.error(
                UsageError("/save needs a file name", "/save chat.md (Markdown) or /save chat.json")
            )
            return
        path = Path(rest).expanduser()
        text = self.to_json() if path.suffix.lower() == ".json" else self.to_markdown()
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        except OSError as err:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            self.notices.error(UsageError(f"cannot write {path}: {err.strerror or err}",
                                          "pick a folder that exists and that you can write to"))
            return
        self.notices.info(f"[saved {len(self.messages)} messages to {path}]")

    def to_json(self) -> str:
        doc = {
            "model": self.name,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "settings": self.settings(),
            "messages": self.conversation(),
        }
        return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"

    def to_markdown(self) -> str:
        lines = [f"# Chat with {self.name}", "", f"_saved {time.strftime('%Y-%m-%d %H:%M')}_", ""]
        for m in self.conversation():
            who = {"system": "System", "user": "You", "assistant": self.name}.get(m["role"], m["role"])
            lines += [f"## {who}", "", m["content"], ""]
        return "\n".join(lines)


def run_repl(session: ChatSession, reader: LineReader) -> int:
    """Read and answer until /exit or end of input; returns the exit code (0)."""
    while True:
        try:
            text = reader.read()
        except KeyboardInterrupt:
            session.notices.info("(Ctrl-D or /exit leaves)")
            continue
        except EOFError:
            session.out.write("\n" if isinstance(reader, TerminalReader) else "")
            session.out.flush()
            return 0
        try:
            if not session.handle(text):
                return 0
        except KeyboardInterrupt:  # outside an answer's own handling (e.g. while the prompt was prepared)
            session.recover()
            session.notices.info("[stopped]")
