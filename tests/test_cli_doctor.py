"""``pipx-llama doctor``: the hardware and, per known model, what would run here and whether it fits -- as
text and as JSON, with the RAM/disk overrides, an installed model, and a model that needs a URL."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from test_models_plan import smol_gguf_manifest

from pipx_llama.cli.main import main
from pipx_llama.config import Config
from pipx_llama.models.manifest import Catalog, parse_manifest
from pipx_llama.models.plan import make_plan
from pipx_llama.models.prepare import prepare
from pipx_llama.models.sources import PullOptions


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPX_LLAMA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PIPX_LLAMA_CONFIG_DIR", str(tmp_path / "config"))
    for var in ("PIPX_LLAMA_MIRROR", "PIPX_LLAMA_OFFLINE", "PIPX_LLAMA_URL", "PIPX_LLAMA_FREE_BYTES",
                "PIPX_LLAMA_FAKE_RAM"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def doctor(capsys, *args: str) -> tuple[int, str]:
    try:
        main(["doctor", *args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().out


def test_json_with_overrides(env, capsys, tmp_path):
    env.setenv("PIPX_LLAMA_FAKE_RAM", "1.5G")
    env.setenv("PIPX_LLAMA_FREE_BYTES", "8G")
    code, out = doctor(capsys, "--json")
    assert code == 0
    data = json.loads(out)
    hw = data["hardware"]
    assert hw["ram_total"] == hw["ram_available"] == 1_500_000_000 and hw["disk_free"] == 8_000_000_000
    assert hw["store_path"] == str(tmp_path / "home") and hw["threads"] >= 1 and hw["cpu_model"]
    assert data["ram_budget"] == 1_350_000_000 and data["simd_summary"]
    models = {m["model"]: m for m in data["models"]}
    smol = models["smollm2-135m-instruct"]
    assert (
        smol["fits"] and smol["status"] == "fits" and smol["quant"] == "Q4_1" and smol["stages"] == ["fetch"]
    )
    tiny = models["tinyllama-1.1b-chat"]
    assert tiny["fits"] and tiny["quant"] == "Q4_K_M" and tiny["ram_bytes"] < 1_350_000_000
    # the manifest's default variant is the original weights, but a ready GGUF of the same quantization is
    # the cheaper road (it was once converted, 2.2 GB fetched and 5.1 GB of disk at peak)
    assert tiny["format"] == "gguf" and tiny["variant"] == "q4_k_m" and tiny["stages"] == ["fetch"]
    assert tiny["status"] == "fits"
    chat7 = models["llama2-7b-chat"]
    assert not chat7["fits"] and chat7["status"].startswith("does not fit: needs 6.5 GB of RAM")
    assert models["llama-7b"]["format"] == "meta-pth" and models["llama-7b"]["quant"] == "Q4_0"
    assert all(o["fits_ram"] is False for o in models["llama-7b"]["options"])
    assert not (tmp_path / "home").exists()  # looking changes nothing


def test_text_report_installed_model_and_url_note(env, capsys, tmp_path, smollm2_path):
    m = smol_gguf_manifest(tmp_path, smollm2_path, "https://127.0.0.1:9/none/")
    cfg = Config(home=tmp_path / "home", config_dir=tmp_path / "config")
    catalog = Catalog([parse_manifest(m.read_text(), str(m))])
    plan = make_plan("smol-gguf", config=cfg, catalog=catalog,
                     pull_options=PullOptions(from_dirs=[smollm2_path.parent], offline=True))
    prepare(plan)
    env.setenv("COLUMNS", "200")  # every column, a row a line
    env.setenv("PIPX_LLAMA_FREE_BYTES", "1000G")  # llama-7b's verdict must not hang on this disk's free space
    code, out = doctor(capsys, "--manifest", str(m), "--ctx", "512")
    assert code == 0
    lines = out.splitlines()
    assert [line.split()[0] for line in lines[:5]] == ["system", "cpu", "simd", "memory", "store"]
    assert f"store    {tmp_path / 'home'}" in out
    header = next(i for i, line in enumerate(lines) if line.startswith("MODEL"))
    rows = {line.split()[0]: line for line in lines[header + 1:] if line and not line.startswith("RAM")}
    assert "installed, fits" in rows["smol-gguf"] and "q4_1 (Q4_1)" in rows["smol-gguf"]
    assert "original -> Q4_0" in rows["llama-7b"] and "needs --url or --from-dir" in rows["llama-7b"]
    assert "7B" in rows["llama2-7b-chat"]


@pytest.mark.parametrize("columns", [80, 120])
def test_the_report_fits_the_terminal(env, capsys, columns):
    # the store's path is printed whole (it is copied from there), so it must fit: pytest's own temporary
    # folders can be longer than 71 characters (under pytest-xdist, say)
    home = Path(tempfile.mkdtemp(prefix="pl-")) / "home"
    env.setenv("PIPX_LLAMA_HOME", str(home))
    env.setenv("COLUMNS", str(columns))
    try:
        code, out = doctor(capsys)
    finally:
        shutil.rmtree(home.parent)
    assert code == 0
    lines = out.splitlines()
    assert max(map(len, lines)) <= columns
    header = next(line for line in lines if line.startswith("MODEL"))
    assert header.split()[:4] == ["MODEL", "RUNS", "AS", "RAM"] and header.split()[-1] == "STATUS"
    assert any(line.startswith("llama2-7b-chat ") and "fits" in line for line in lines)
    if columns == 80:
        assert "(ALIASES, DOWNLOAD, PEAK DISK left out to fit 80 columns;" in out


def test_registered_in_the_command_list(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "doctor" in out and "provision" in out
