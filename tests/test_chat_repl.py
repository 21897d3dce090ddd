"""The interactive chat (``cli/chat.py``): multi-line input, slash commands, saving, Ctrl-C, a full
context -- in-process on the real SmolLM2 model, then through a pseudo-terminal as a user types."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from greedy import ANSWER, BRIEFLY, CHAT, COUNTING, FOLLOW_UP, QUESTION, SECOND_TURN, TWO_LINES

from pipx_llama.cli.chat import ChatSession, PlainReader, finish_input, needs_more, run_repl
from pipx_llama.engine.sampler import GREEDY

# The questions and answers come from tests/greedy.py: measured with no near-tie on any CPU.


# --- multi-line input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "more"), [
    ("hello", False),
    ("hello\\", True),
    ("hello\\\nworld", False),
    ('"""', True),
    ('"""\nfirst line', True),
    ('"""\nfirst line\n"""', False),
    ('"""one line"""', False),
    ('say """ here', False),
    ('"""\nends with a backslash\\', True),
])
def test_needs_more(text, more):
    assert needs_more(text) is more


def test_finish_input():
    assert finish_input("one\\\ntwo\\\nthree") == "one\ntwo\nthree"
    assert finish_input('"""\ndef f():\n    return 1\\\n"""') == "def f():\n    return 1\\"
    assert finish_input('"""inline"""') == "inline"
    assert finish_input("plain") == "plain"


def test_plain_reader_joins_continued_lines():
    reader = PlainReader(io.StringIO('first\\\nsecond\n"""\na\n\nb\n"""\nlast\n'))
    assert reader.read() == "first\nsecond"
    assert reader.read() == "a\n\nb"
    assert reader.read() == "last"
    with pytest.raises(EOFError):
        reader.read()


# --- the session, in-process --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(smollm2_path):
    from pipx_llama.engine.model import load_model

    m = load_model(smollm2_path, threads=2)
    yield m
    m.close()


def session(model, n_ctx=1024, max_tokens=32, out=None, **kw) -> tuple[ChatSession, io.StringIO, io.StringIO]:
    out = out if out is not None else io.StringIO()
    err = io.StringIO()
    s = ChatSession(model, model.new_context(n_ctx), sampler=GREEDY, max_tokens=max_tokens, name="smollm2",
                    out=out, err=err, **kw)
    return s, out, err


@pytest.mark.slow
@pytest.mark.fidelity
def test_two_turns_reuse_the_cache_and_verbose_reports_timings(model):
    s, out, err = session(model, verbose=True)
    first = s.ask(QUESTION)
    assert CHAT.ends and first.text == CHAT.answer == ANSWER and first.finish == "stop"
    assert out.getvalue() == first.text + "\n"
    second = s.ask(FOLLOW_UP)
    assert SECOND_TURN.ends and second.text == SECOND_TURN.answer and second.finish == "stop"
    stats = second.generation.stats
    assert 0 < stats.n_prompt_evaluated < stats.n_prompt  # the first exchange came from the KV cache
    assert [m["role"] for m in s.messages] == ["user", "assistant", "user", "assistant"]
    assert err.getvalue().count("tokens per second") == 4
    assert "prompt eval time" in err.getvalue() and "reused from the cache" in err.getvalue()


@pytest.mark.slow
def test_commands(model, tmp_path):
    s, out, err = session(model, max_tokens=8)
    assert s.handle("/set temp 0.5") and s.sampler.temperature == 0.5
    assert s.handle("/set top_k 7") and s.sampler.top_k == 7
    assert s.handle("/set top-p 0.9") and s.sampler.top_p == 0.9
    assert s.handle("/set max_tokens 12") and s.max_tokens == 12
    assert s.handle("/set seed 42") and s.sampler.seed == 42
    assert s.handle("/set seed none") and s.sampler.seed is None
    for bad in ("/set temp hot", "/set top_p 0", "/set max_tokens 0", "/set warp 9", "/set temp"):
        assert s.handle(bad)
    assert (s.sampler.temperature, s.sampler.top_p, s.max_tokens) == (0.5, 0.9, 12)
    assert err.getvalue().count("error: ") == 5
    s.handle("/set")
    assert "temp 0.5  top_p 0.9  top_k 7" in err.getvalue()

    s.handle("/system You are a pirate.")
    assert s.conversation() == [{"role": "system", "content": "You are a pirate."}]
    s.handle("/system -")
    assert s.system is None
    s.handle("/nope")
    assert "unknown command /nope" in err.getvalue()
    s.handle("/help")
    assert "/save FILE" in err.getvalue()
    assert out.getvalue() == ""  # commands never write to the answer stream

    s.sampler = GREEDY
    s.handle("//etc/hosts: what is this file?")
    assert s.messages[0] == {"role": "user", "content": "/etc/hosts: what is this file?"}
    s.handle("/reset")
    assert s.messages == [] and "[conversation cleared]" in err.getvalue()
    assert s.handle("/exit") is False and s.handle("/quit") is False


@pytest.mark.slow
@pytest.mark.fidelity
def test_save_as_json_and_markdown(model, tmp_path):
    s, _out, err = session(model, max_tokens=24, system=BRIEFLY.messages[0]["content"])
    s.ask(QUESTION)
    s.handle(f"/save {tmp_path / 'chat.json'}")
    doc = json.loads((tmp_path / "chat.json").read_text())
    assert doc["model"] == "smollm2" and doc["settings"]["max_tokens"] == 24
    assert [m["role"] for m in doc["messages"]] == ["system", "user", "assistant"]
    assert doc["messages"][1]["content"] == QUESTION and doc["messages"][2]["content"].startswith(
        BRIEFLY.answer
    )
    s.handle(f"/save {tmp_path / 'chat.md'}")
    md = (tmp_path / "chat.md").read_text()
    assert md.startswith("# Chat with smollm2\n")
    assert (
        "## System\n\nAnswer briefly.\n" in md and f"## You\n\n{QUESTION}\n" in md and "## smollm2\n\n" in md
    )
    s.handle(f"/save {tmp_path / 'no-such-dir' / 'chat.md'}")
    assert "error: cannot write" in err.getvalue()
    assert not list(tmp_path.glob("*.tmp"))


class _InterruptAfter(io.StringIO):
    """An answer stream that sends this process a Ctrl-C (SIGINT) after ``n`` pieces of text."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def write(self, text: str) -> int:
        self.n -= 1
        if self.n == 0:
            signal.raise_signal(signal.SIGINT)
        return super().write(text)


@pytest.mark.slow
@pytest.mark.fidelity
def test_ctrl_c_stops_the_answer_and_keeps_the_session(model):
    out = _InterruptAfter(5)
    s, _, err = session(model, max_tokens=200, out=out)
    before = signal.getsignal(signal.SIGINT)
    turn = s.ask(COUNTING)  # an answer the same on every CPU, so is the question after it (greedy.py)
    assert turn.finish == "cancelled" and 5 <= turn.generation.stats.n_generated < 12
    assert "[stopped]" in err.getvalue()
    assert s.messages[-1] == {"role": "assistant", "content": turn.text} and turn.text
    assert s.ctx.n_past == len(s.ctx.tokens)
    assert signal.getsignal(signal.SIGINT) is before  # the handler was put back
    s.max_tokens = 24
    assert "Paris" in s.ask(QUESTION).text  # the session goes on from what the cache holds


@pytest.mark.slow
@pytest.mark.fidelity
def test_a_full_context_drops_the_oldest_exchanges_with_a_notice(model):
    s, _out, err = session(model, n_ctx=160, max_tokens=400)
    first = s.ask(COUNTING)  # 100 numbers: more than the context holds, on any CPU
    assert first.finish == "context-full"
    assert "[context full: the answer was cut after" in err.getvalue()
    second = s.ask(QUESTION)
    assert "[context full: dropped the 1 oldest exchange" in err.getvalue()
    assert s.messages[0] == {"role": "user", "content": QUESTION} and second.text
    assert s.ctx.n_past <= 160


@pytest.mark.slow
def test_a_message_longer_than_the_context_is_refused_and_the_session_goes_on(model):
    s, _out, err = session(model, n_ctx=64, max_tokens=8)
    turn = s.ask("word " * 100)
    assert turn.finish == "error" and s.messages == []
    assert "error: the message is" in err.getvalue()
    assert s.ask("Hi").finish in ("stop", "length")


@pytest.mark.slow
def test_run_repl_reads_scripted_input(model, tmp_path):
    s, _out, _err = session(model, max_tokens=24)
    reader = PlainReader(
        io.StringIO(f"{QUESTION}\n\n/set max_tokens 4\nTell me \\\nmore.\n/exit\nnever read\n")
    )
    assert run_repl(s, reader) == 0
    assert [m["content"] for m in s.messages if m["role"] == "user"] == [QUESTION, "Tell me \nmore."]
    assert s.max_tokens == 4


@pytest.mark.slow
def test_ctrl_c_while_a_turn_is_prepared_keeps_the_session(model, monkeypatch):
    s, _out, err = session(model, max_tokens=8)

    def interrupted() -> list[int]:
        raise KeyboardInterrupt

    monkeypatch.setattr(s, "_fitted_prompt", interrupted)
    assert run_repl(s, PlainReader(io.StringIO("Hello\n/exit\n"))) == 0
    assert s.messages == [] and "[stopped]" in err.getvalue()


# --- through a pseudo-terminal ------------------------------------------------------------------------------


def _spawn(args: list[str], tmp_path, env: dict | None = None):
    pexpect = pytest.importorskip("pexpect")
    # the pseudo-terminal's size is the width; COLUMNS and LINES would override it (pytest-xdist sets them)
    child_env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "COLUMNS", "LINES")}
    child_env.update({"TERM": "xterm-256color", "PIPX_LLAMA_HISTORY": str(tmp_path / "history"),
                      "PROMPT_TOOLKIT_NO_CPR": "1", **(env or {})})
    child = pexpect.spawn(sys.executable, ["-m", "pipx_llama.cli", *args],
                          env=child_env, encoding="utf-8", timeout=180, dimensions=(40, 160))
    log = io.StringIO()
    child.logfile_read = log
    return child, log


@pytest.mark.slow
@pytest.mark.fidelity
@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")
def test_chat_in_a_terminal(smollm2_path, tmp_path):
    """Two turns, Ctrl-C during a long answer, /reset, a multi-line message, Ctrl-D -- as a user types."""
    import pexpect

    t0 = time.perf_counter()
    child, log = _spawn(["-m", str(smollm2_path), "--temp", "0", "-c", "2048", "--verbose"], tmp_path)
    child.expect("Ctrl-D leaves")
    child.expect("> ")
    child.send(QUESTION + "\r")
    child.expect("Paris")
    child.expect("tokens per second")
    child.expect("> ")
    child.send(FOLLOW_UP + "\r")
    child.expect("Rome")
    child.expect(r"\(\d+ reused from the cache\)")  # the second turn only evaluated what was new
    child.expect("> ")

    child.send("/set max_tokens 2000\r")
    child.expect(r"\[max_tokens = 2000\]")
    child.expect("> ")
    child.send("Write a very long story about a dragon.\r")
    child.expect(r"dragon\.[^\n]*\n")  # the echo of the line typed
    child.expect(r"\w+ \w+ \w+ \w+")  # the answer is streaming (a Ctrl-C typed earlier reaches the prompt)
    child.sendintr()
    child.expect(r"\[stopped\]", timeout=60)
    child.expect("> ")

    child.send("/reset\r")
    child.expect(r"\[conversation cleared\]")
    child.expect("> ")
    child.send("/set max_tokens 24\r")
    child.expect("> ")
    first_line, second_line = TWO_LINES.messages[0]["content"].split("\n")
    child.send(first_line + "\\\r")  # a trailing backslash goes on to the next line
    child.expect("…")  # the continuation prompt
    child.send(second_line + "\r")
    child.expect("Paris")
    child.expect("> ")
    child.send("/save " + str(tmp_path / "chat.json") + "\r")
    child.expect(r"\[saved 2 messages")
    child.expect("> ")
    child.sendcontrol("d")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, log.getvalue()[-2000:]
    print(f"\nterminal chat session: {time.perf_counter() - t0:.1f} s")

    doc = json.loads((tmp_path / "chat.json").read_text())
    assert [m["content"] for m in doc["messages"] if m["role"] == "user"] == [
        TWO_LINES.messages[0]["content"]
    ]
    history = (tmp_path / "history").read_text()
    assert QUESTION in history and "/reset" in history
    assert "\x1b[2m" in log.getvalue()  # notices are dim on a colour terminal


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")
def test_bare_command_chats_with_the_default_model_without_colour_under_no_color(smollm2_path, tmp_path):
    """`pipx-llama` alone in a terminal: the default model from the store; NO_COLOR; Ctrl-C at the prompt."""
    import pexpect

    env = {"PIPX_LLAMA_HOME": str(tmp_path / "home"), "PIPX_LLAMA_CONFIG_DIR": str(tmp_path / "config"),
           "NO_COLOR": "1"}
    pulled = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipx_llama.cli",
            "pull",
            "smollm2",
            "--offline",
            "--from-dir",
            str(smollm2_path.parent),
        ],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert pulled.returncode == 0, pulled.stderr
    child, log = _spawn([], tmp_path, env=env)
    child.expect("smollm2-135m-instruct \\(Q4_1, context 4096 tokens")
    child.expect("Ctrl-D leaves")
    child.expect(">")  # the prompt (without colour, prompt_toolkit draws its space as a cursor move)
    child.send("half a thought")
    child.sendintr()  # at the prompt: clears the line, the session stays
    child.expect(r"\(Ctrl-D or /exit leaves\)")
    child.expect(">")
    child.send("/exit\r")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    text = log.getvalue()
    assert "\x1b[2m" not in text and "32;1m" not in text and "38;5;" not in text, text[-1000:]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")
def test_a_long_prompt_shows_its_progress_and_ctrl_c_stops_it(smollm2_path, tmp_path):
    """A long message: a spinner with tokens done / total; Ctrl-C stops the evaluation after its current
    batch (not at the end of the prompt) and the session goes on; answers wrap within a narrow terminal."""
    import pexpect

    child, log = _spawn(["-m", str(smollm2_path), "--temp", "0", "-c", "4096"], tmp_path)
    child.setwinsize(40, 60)
    child.expect("Ctrl-D leaves")
    child.expect("> ")
    # about 3,000 tokens (seconds of evaluation on any CPU here), pasted: typed, it would take minutes
    child.send("\x1b[200~" + "word " * 3000 + "\x1b[201~")
    child.send("\r")
    child.expect(r"processing the prompt: \d+/30\d\d tokens \(\d+ s\)", timeout=120)
    child.sendintr()
    child.expect(r"\[stopped\]", timeout=30)
    child.expect("> ")
    child.send("/set max_tokens 60\r")
    child.expect("> ")
    child.send("Write a very long story about a dragon.\r")
    child.expect(r"max_tokens reached", timeout=120)
    child.expect("> ")
    child.sendcontrol("d")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, log.getvalue()[-2000:]
    answer = log.getvalue().split("dragon.", 1)[1].split("max_tokens reached", 1)[0]
    # every redraw of the streaming answer (a line rewritten after \r) fits the 60 columns
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", answer).replace("\r", "\n")
    longest = max(plain.split("\n"), key=len)
    assert len(longest) <= 60, repr(longest)  # rich wrapped it to the terminal
