"""The minimal CLI in subprocesses: run, tokenize, perplexity, one-line errors with exit codes, and a help
that answers at once (no heavy import before a command needs it)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from greedy import golden_prefix

from pipx_llama.cli import main as cli_main

# what `--help` must not import: each costs a noticeable part of a second at start-up
HEAVY = ("numba", "llvmlite", "numpy", "jinja2", "starlette", "uvicorn", "rich", "prompt_toolkit", "httpx",
         "gguf")


def cli(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipx_llama.cli", *args], capture_output=True, text=True,
                          input=stdin, timeout=600, check=False, env={**os.environ, **(env or {})})


def test_help_lists_commands():
    out = cli("--help")
    assert out.returncode == 0
    for cmd in ("run", "tokenize", "perplexity"):
        assert cmd in out.stdout


def test_help_describes_every_command_in_one_line_of_80_columns():
    out = cli("--help", env={"COLUMNS": "80"})
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    text = " ".join(out.stdout.split())
    for name, (_, summary) in cli_main.COMMANDS.items():
        assert f" {name} {summary} " in text, name  # after the name (on its line or the next)
        assert any(line.endswith(f" {summary}") for line in lines), name  # and on one line
    assert max(map(len, lines)) <= 80


@pytest.mark.parametrize("command", ["", *cli_main.COMMANDS])
def test_help_imports_no_heavy_module(command):
    """`pipx-llama [COMMAND] --help` builds its parser without numba, numpy, jinja2, starlette or rich."""
    code = (
        "import contextlib, io, json, sys\n"
        "from pipx_llama.cli import main\n"
        "argv = [a for a in sys.argv[1:] if a]\n"
        "parser = main.build_parser(argv[0] if argv else '')\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    parser.parse_args([*argv, '--help'])\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, command], capture_output=True, text=True, check=True)
    loaded = {name.split(".")[0] for name in json.loads(out.stdout)}
    assert not loaded & set(HEAVY), f"`{command} --help` imports {sorted(loaded & set(HEAVY))}"


def test_the_road_to_a_local_file_imports_no_http_client():
    """httpx (60 ms of a 1 s warm start) is imported when a download starts, not by the modules that
    plan, resolve and prepare a model."""
    code = (
        "import json, sys\n"
        "import pipx_llama.models.prepare, pipx_llama.models.pull, pipx_llama.models.mirror\n"
        "import pipx_llama.fetch.http, pipx_llama.fetch.document, pipx_llama.cli.run_cmd\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = {name.split(".")[0] for name in json.loads(out.stdout)}
    assert not loaded & {"httpx", "httpcore", "h11"}


def test_each_command_says_the_summary_the_top_level_help_shows():
    parser = cli_main.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    shown = {a.dest: a.help for a in sub._choices_actions}
    assert shown == {name: summary for name, (_, summary) in cli_main.COMMANDS.items()}


def test_the_help_names_the_engines_sampling_defaults_and_quant_types():
    from pipx_llama.cli.options import SAMPLING_DEFAULTS
    from pipx_llama.cli.quantize_cmd import QUANT_TYPES
    from pipx_llama.engine import SamplerConfig
    from pipx_llama.quant.rules import FILE_TYPES

    d = SamplerConfig()
    assert vars(SAMPLING_DEFAULTS) == {k: getattr(d, k) for k in vars(SAMPLING_DEFAULTS)}
    assert QUANT_TYPES == tuple(FILE_TYPES)


def test_an_unknown_command_says_so_and_suggests():
    out = cli("shwo", "smollm2")
    assert out.returncode == 2
    assert out.stderr.splitlines()[0] == "error: no command named 'shwo'"
    assert "`pipx-llama show`" in out.stderr or "`pipx-llama --help` lists the commands" in out.stderr
    out = cli("serv", "smollm2")
    assert out.returncode == 2 and "did you mean `pipx-llama serve`" in out.stderr


@pytest.mark.slow
def test_tokenize_prints_llama_cpp_ids(smollm2_path, golden):
    case = golden["cases"][4]
    out = cli("tokenize", "-m", str(smollm2_path), case["prompt"])
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == case["prompt_ids"]


@pytest.mark.slow
def test_run_greedy_completion(smollm2_path, golden):
    case = golden["cases"][0]
    ids, text = golden_prefix(case)
    out = cli(
        "run", "-m", str(smollm2_path), "--raw", "-p", case["prompt"], "-n", str(len(ids)), "--temp", "0",
        "-t", "2",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == case["prompt"] + text + "\n"


@pytest.mark.slow
def test_run_reads_prompt_from_stdin_and_stops_at_stop_string(smollm2_path, golden):
    case = golden["cases"][0]
    _, text = golden_prefix(case)
    line, newline, _ = text.partition("\n")
    assert newline, "the golden prefix must reach the end of a line"
    out = cli("run", "-m", str(smollm2_path), "--raw", "-n", "40", "--temp", "0", "--stop", "\n", "--verbose",
              stdin=case["prompt"])
    assert out.returncode == 0, out.stderr
    assert out.stdout == case["prompt"] + line + "\n"
    assert "tokens/s" in out.stderr


@pytest.mark.slow
def test_perplexity_matches_llama_cpp_chunked(smollm2_path, golden, ppl_text_path):
    ref = golden["chunk_perplexity"]
    out = cli(
        "perplexity", "-m", str(smollm2_path), "--ctx-size", str(ref["n_ctx"]), str(ppl_text_path), "--json"
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    print(f"\nchunked perplexity: ours {result['ppl']:.4f}, llama.cpp {ref['ppl']:.4f} "
          f"({result['ppl'] / ref['ppl'] - 1:+.2%})")
    assert (result["chunks"], result["scored"]) == (ref["chunks"], ref["scored"])
    assert abs(result["ppl"] / ref["ppl"] - 1) <= 0.03


def test_missing_model_file_is_one_clean_line(tmp_path):
    out = cli("run", "-m", str(tmp_path / "nope.gguf"), "-p", "hi")
    assert out.returncode == 3
    assert "Traceback" not in out.stderr
    assert "nope.gguf: no such file" in out.stderr


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_text("this is not a model, just some text that is long enough")
    out = cli("run", "-m", str(bad), "-p", "hi")
    assert out.returncode == 3
    assert "not a GGUF file" in out.stderr and "Traceback" not in out.stderr


def test_bad_sampling_option_is_usage_error(tmp_path):
    out = cli("run", "-m", str(tmp_path / "x.gguf"), "-p", "hi", "--top-p", "0")
    assert out.returncode == 2
    assert "top-p" in out.stderr


@pytest.mark.slow
def test_run_by_name_pulls_into_the_store_then_reuses_it(smollm2_path, golden, tmp_path, monkeypatch):
    monkeypatch.setenv("PIPX_LLAMA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PIPX_LLAMA_CONFIG_DIR", str(tmp_path / "config"))
    case = golden["cases"][0]
    ids, text = golden_prefix(case)
    args = (
        "run",
        "smollm2-135m-instruct",
        "--raw",
        "-p",
        case["prompt"],
        "-n",
        str(len(ids)),
        "--temp",
        "0",
        "--offline",
    )
    first = cli(*args, "--from-dir", str(smollm2_path.parent))
    assert first.returncode == 0, first.stderr
    assert first.stdout == case["prompt"] + text + "\n"
    stored = list((tmp_path / "home").rglob("*.gguf"))
    assert stored, "the model was not installed in the store"
    second = cli(*args)  # no --from-dir: the store has it now
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout


def test_run_unknown_model_name_suggests(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPX_LLAMA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PIPX_LLAMA_CONFIG_DIR", str(tmp_path / "config"))
    out = cli("run", "smollm3", "-p", "hi", "--offline")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "smollm2-135m-instruct" in out.stderr


class _Terminal(io.TextIOWrapper):
    def isatty(self) -> bool:
        return True


def test_streams_speak_utf8_through_pipes_and_never_fail_on_a_terminal(monkeypatch):
    """Windows gives redirected streams its ANSI code page (cp1252, strict errors)."""
    if sys.flags.utf8_mode:
        pytest.skip("UTF-8 mode already makes every stream UTF-8")
    monkeypatch.delenv("PYTHONIOENCODING", raising=False)
    piped_out, piped_in = io.BytesIO(), io.BytesIO("Résumé → 你好\n".encode())
    terminal = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(piped_out, encoding="cp1252"))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(piped_in, encoding="cp1252"))
    monkeypatch.setattr(sys, "stderr", _Terminal(terminal, encoding="cp1252"))
    cli_main.utf8_streams()
    assert sys.stdin.readline() == "Résumé → 你好\n"
    sys.stdout.write("→ 你好\n")
    sys.stdout.flush()
    assert piped_out.getvalue().decode("utf-8") == "→ 你好\n"
    sys.stderr.write("é → 你好\n")  # a terminal keeps its encoding, and what it cannot show becomes "?"
    sys.stderr.flush()
    assert terminal.getvalue() == "é ? ??\n".encode("cp1252")
