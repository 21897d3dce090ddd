"""``pipx-llama [run] MODEL``: routing a bare model name to ``run``, one-shot runs (-p, stdin, --json,
--chat -p), terminal manners (one-line errors with hints, --debug, no colour) and exit codes."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from greedy import CHAT, QUESTION, golden_prefix

from pipx_llama.cli import main as cli_main
from pipx_llama.cli import road, run_cmd


def cli(*args: str, stdin: str | None = "", env: dict | None = None) -> subprocess.CompletedProcess:
    """The CLI in a subprocess; stdin is a pipe (empty unless given), never a terminal."""
    return subprocess.run(
        [sys.executable, "-m", "pipx_llama.cli", *args],
        capture_output=True,
        text=True,
        check=False,
        input=stdin,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A private store and config dir, for this process and the CLI subprocesses."""
    monkeypatch.setenv("PIPX_LLAMA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PIPX_LLAMA_CONFIG_DIR", str(tmp_path / "config"))
    return tmp_path / "home"


# --- routing ------------------------------------------------------------------------------------------------


class _Stdin(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


@pytest.mark.parametrize(("argv", "expected", "implicit"), [
    (["7B"], ["run", "7B"], True),
    (["7B", "-p", "hi"], ["run", "7B", "-p", "hi"], True),
    (["-m", "x.gguf", "-p", "hi"], ["run", "-m", "x.gguf", "-p", "hi"], True),
    (["run", "7B"], ["run", "7B"], False),
    (["list"], ["list"], False),
    (["--version"], ["--version"], False),
    (["help", "run"], ["run", "--help"], False),
    (["help"], ["--help"], False),
])
def test_a_first_argument_that_is_no_command_means_run(argv, expected, implicit):
    args, debug, was_implicit = cli_main._normalize(argv)
    assert (args, debug, was_implicit) == (expected, False, implicit)


def test_debug_is_accepted_anywhere_before_a_double_dash():
    assert cli_main._normalize(["7B", "--debug", "-p", "hi"]) == (["run", "7B", "-p", "hi"], True, True)
    assert cli_main._normalize(["run", "--", "--debug"]) == (["run", "--", "--debug"], False, False)


def test_no_arguments_chat_on_a_terminal_help_otherwise(monkeypatch):
    monkeypatch.setattr(sys, "stdin", _Stdin(tty=True))
    monkeypatch.setattr(sys, "stdout", _Stdin(tty=True))
    assert cli_main._normalize([]) == (["run"], False, True)
    monkeypatch.setattr(sys, "stdin", _Stdin(tty=False))
    assert cli_main._normalize([]) == ([], False, False)


def test_no_arguments_without_a_terminal_prints_help():
    out = cli()
    assert out.returncode == 2
    assert "usage: pipx-llama" in out.stdout and "run" in out.stdout


def test_mistyped_command_is_suggested(home):
    out = cli("lsit", "--offline")
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "error: no model named 'lsit'",
        ("hint: `list` is a command: did you mean `pipx-llama list`? `pipx-llama list --available` shows the "
        "known models; add your own with --manifest FILE"),
    ]


def test_bad_argument_is_one_line_and_a_hint_naming_the_command_help():
    out = cli("-m", "x.gguf", "--no-such-option")
    assert out.returncode == 2
    assert out.stderr.splitlines() == ["error: unrecognized arguments: --no-such-option",
                                       "hint: see `pipx-llama run --help`"]
    out = cli("run", "-n", "many")
    assert out.returncode == 2
    assert out.stderr.startswith("error: argument -n/--n-predict: invalid int value: 'many'\nhint: ")


@pytest.mark.parametrize(("args", "message"), [
    (["--json", "--chat", "-m", "x.gguf"], "--json answers one prompt; there is none"),
    (["-m", "x.gguf"], "the prompt read from stdin is empty"),
    (["smollm2", "-m", "x.gguf", "-p", "hi"], "both a model name (smollm2) and -m x.gguf were given"),
    (["-m", "x.gguf", "--quant", "Q4_0", "-p", "hi"], "--quant applies to a model by name, not to -m FILE"),
    (["-m", "x.gguf", "-p", "hi", "-n", "-5"],
     "-n/--n-predict is -5; it takes -1 (no limit) or a number of tokens >= 0"),
    (["-m", "x.gguf", "-f", "/nonexistent/prompt.txt"],
     "cannot read the prompt file /nonexistent/prompt.txt: No such file or directory"),
    (["-m", "x.gguf", "--raw", "--chat"], None),
    (["-m", "x.gguf", "--raw", "-p", "hi", "-sys", "be brief"],
     "--system applies to a chat turn; --raw (or a model without a chat template) completes the prompt "
     "as it is"),
])
def test_usage_errors(args, message, home):
    out = cli(*args)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.splitlines()
    if message is None:  # argparse's own: the two are exclusive
        message = "argument --chat: not allowed with argument --raw"
    if "--json" in args:  # with --json, the error is JSON too
        record = json.loads(out.stderr)
        assert record["message"] == message and record["hint"] and record["exit_code"] == 2
        return
    assert lines[0] == f"error: {message}" and lines[1].startswith("hint: ") and len(lines) == 2


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    def boom(args):
        raise RuntimeError("something [odd] broke")

    monkeypatch.setattr(run_cmd, "run", boom)
    with pytest.raises(SystemExit) as exc:
        cli_main.main(["-m", "x.gguf", "-p", "hi"])
    assert exc.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: unexpected RuntimeError: something [odd] broke",
        "hint: run again with --debug to see the traceback, and please report it",
    ]
    with pytest.raises(RuntimeError, match="odd"):
        cli_main.main(["-m", "x.gguf", "--debug", "-p", "hi"])


def test_colour_only_on_a_terminal_without_no_color(monkeypatch):
    tty, pipe = _Stdin(tty=True), _Stdin(tty=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    assert run_cmd.color_enabled(tty) and not run_cmd.color_enabled(pipe)
    monkeypatch.setenv("NO_COLOR", "1")
    assert not run_cmd.color_enabled(tty)
    monkeypatch.delenv("NO_COLOR")
    monkeypatch.setenv("TERM", "dumb")
    assert not run_cmd.color_enabled(tty)


def test_plan_is_shown_as_a_table():
    from types import SimpleNamespace

    plan = SimpleNamespace(
        model="tinyllama-1.1b-chat",
        variant="safetensors",
        source_format="hf-safetensors",
        quant="Q4_0",
        download_bytes=2_200_000_000,
        peak_disk_bytes=4_400_000_000,
        ram_bytes=900_000_000,
        threads=2,
        n_ctx=2048,
        stages=["fetch", "convert", "quantize"],
    )
    buf = io.StringIO()
    road.show_plan(plan, buf, color=False)
    text = buf.getvalue()
    assert "\x1b[" not in text
    assert text.splitlines() == [
        "pipx-llama will prepare tinyllama-1.1b-chat:",
        "  model         tinyllama-1.1b-chat (safetensors, hf-safetensors)",
        "  quantization  Q4_0",
        "  download      2.2 GB",
        "  peak disk     4.4 GB",
        "  RAM needed    900.0 MB",
        "  threads       2",
        "  context       2048 tokens",
        "  steps         fetch → convert → quantize",
    ]


# --- one-shot on the real model -----------------------------------------------------------------------------


@pytest.mark.slow
def test_bare_model_file_completes_a_prompt(smollm2_path, golden):
    case = golden["cases"][0]
    ids, text = golden_prefix(case)
    out = cli("-m", str(smollm2_path), "--raw", "-p", case["prompt"], "-n", str(len(ids)), "--temp", "0",
              "--verbose")
    assert out.returncode == 0, out.stderr
    assert out.stdout == case["prompt"] + text + "\n"
    assert "load:" in out.stderr and "tokens/s" in out.stderr


@pytest.mark.slow
def test_raw_completion_of_a_prompt_file_without_displaying_the_prompt(smollm2_path, golden, tmp_path):
    case = golden["cases"][0]
    ids, text = golden_prefix(case)
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(case["prompt"], encoding="utf-8")
    out = cli("-m", str(smollm2_path), "--raw", "-f", str(prompt_file), "--no-display-prompt",
              "-n", str(len(ids)), "--temp", "0")
    assert out.returncode == 0, out.stderr
    assert out.stdout == text + "\n"


@pytest.mark.slow
def test_json_gives_text_token_counts_and_timings(smollm2_path, golden):
    case = golden["cases"][0]
    ids, text = golden_prefix(case)
    out = cli("run", "-m", str(smollm2_path), "-n", str(len(ids)), "--temp", "0", "--json", "--raw",
              stdin=case["prompt"])
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["text"] == text
    assert result["mode"] == "completion" and result["finish_reason"] == "length"
    assert result["tokens"] == {
        "prompt": len(case["prompt_ids"]),
        "prompt_evaluated": len(case["prompt_ids"]),
        "generated": len(ids),
    }
    assert set(result["timings"]) == {"load_ms", "prompt_ms", "generation_ms", "prompt_tokens_per_second",
                                      "generation_tokens_per_second"}
    assert all(v > 0 for v in result["timings"].values())


@pytest.mark.slow
@pytest.mark.fidelity
@pytest.mark.parametrize("flags", [(), ("--chat",)], ids=["default", "--chat"])
def test_a_prompt_to_a_chat_model_is_one_chat_turn(smollm2_path, flags):
    out = cli("-m", str(smollm2_path), *flags, "-p", QUESTION, "--temp", "0", "-n", "24", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["mode"] == "chat" and result["text"] == CHAT.answer  # measured with no near-tie (greedy.py)
    assert CHAT.ends and result["finish_reason"] == "stop"  # the model ended its turn


@pytest.mark.slow
@pytest.mark.fidelity
def test_a_chat_turn_prints_the_answer_only(smollm2_path):
    out = cli("-m", str(smollm2_path), "-p", QUESTION, "--temp", "0", "-n", "24")
    assert out.returncode == 0, out.stderr
    assert out.stdout == CHAT.answer + "\n"


@pytest.mark.slow
def test_the_system_prompt_reaches_the_template(smollm2_path):
    """The one chat turn carries -sys: the prompt is longer than with the template's default system text."""
    counts = []
    for flags in ((), ("-sys", "You answer in one word. " * 30)):
        out = cli("-m", str(smollm2_path), *flags, "-p", QUESTION, "--temp", "0", "-n", "1", "--json")
        assert out.returncode == 0, out.stderr
        counts.append(json.loads(out.stdout)["tokens"]["prompt"])
    assert counts[1] > counts[0]


@pytest.mark.slow
def test_a_context_full_error_is_never_in_the_middle_of_the_answer(smollm2_path):
    out = cli("-m", str(smollm2_path), "--raw", "-c", "16", "-n", "64", "--temp", "0",
              "-p", "Once upon a time")
    assert out.returncode == 4
    assert out.stdout.startswith("Once upon a time") and out.stdout.endswith("\n")
    # a line of its own on stderr (after the "loading" line of a slow machine, if any)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert errors[0].startswith("error: the context of 16 tokens is full")


@pytest.mark.slow
def test_full_context_is_exit_code_4(smollm2_path):
    out = cli("-m", str(smollm2_path), "-c", "8", "-p", "one two three four five six seven eight nine ten")
    assert out.returncode == 4
    assert "\nerror: the prompt has " in "\n" + out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_bare_alias_runs_from_the_store(smollm2_path, golden, home):
    case = golden["cases"][0]
    ids, text = golden_prefix(case)
    args = ("smollm2", "--raw", "-p", case["prompt"], "-n", str(len(ids)), "--temp", "0", "--offline")
    first = cli(*args, "--from-dir", str(smollm2_path.parent))
    assert first.returncode == 0, first.stderr
    assert first.stdout == case["prompt"] + text + "\n"
    second = cli(*args)
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
