"""Sizes and shapes a plan needs before anything is downloaded: file sizes by quantization, and the
dimensions the KV cache depends on.

The shape comes from the model's own files when they are in the store, else from a table of
well-known models (by parameter count), else from a rough estimate that errs on the high side. A
file without a published size gets a share of the variant's size estimated from the parameter count.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from pipx_llama.errors import PipxLlamaError
from pipx_llama.models.manifest import Manifest, ManifestFile, Variant
from pipx_llama.models.store import Store
from pipx_llama.system import kv_cache_bytes

# Approximate bits per weight of whole files (llama.cpp's figures), for disk estimates only.
BITS_PER_WEIGHT = {
    "F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.56, "Q5_1": 6.0, "Q5_0": 5.5,
    "Q5_K_M": 5.69, "Q5_K_S": 5.54, "Q4_1": 5.0, "Q4_0": 4.5, "Q4_K_M": 4.85, "Q4_K_S": 4.58,
    "Q3_K_M": 3.91, "Q2_K": 3.35,
}


def estimate_gguf_bytes(parameters: int, quantization: str) -> int:
    """Rough size of a GGUF of ``parameters`` weights in ``quantization`` (for disk pre-checks)."""
    bits = BITS_PER_WEIGHT.get(quantization.upper(), 16.0)
    return int(parameters * bits / 8)


def estimated_file_size(manifest: Manifest, variant: Variant, mf: ManifestFile) -> int:
    """The published size, or a share of the variant's size estimated from the parameter count."""
    if mf.size is not None:
        return mf.size
    unknown = [f for f in variant.files if f.size is None]
    if variant.format == "gguf":
        total = estimate_gguf_bytes(manifest.parameters, variant.quantization or "F16")
    else:
        total = manifest.parameters * 2  # original checkpoints are 16-bit
    return max(0, total - variant.known_size) // max(1, len(unknown))




@dataclass(frozen=True)
class ModelShape:
    """What the KV cache size depends on. ``exact`` is False for an estimate from the parameter count."""

    n_layers: int
    n_kv_heads: int
    head_dim: int
    exact: bool = True

    def kv_bytes(self, n_ctx: int, cache_types: tuple[str, str] = ("f16", "f16")) -> int:
        return kv_cache_bytes(self.n_layers, n_ctx, self.n_kv_heads, self.head_dim, cache_types)


# Well-known models by exact parameter count (from their config.json / params.json).
KNOWN_SHAPES = {
    134515008: ModelShape(30, 3, 64),       # SmolLM2-135M
    1100048384: ModelShape(22, 4, 64),      # TinyLlama 1.1B
    6738415616: ModelShape(32, 32, 128),    # LLaMA 7B, Llama 2 7B
    7241732096: ModelShape(32, 8, 128),     # Mistral 7B
    13015864320: ModelShape(40, 40, 128),   # LLaMA 13B, Llama 2 13B
    32528943616: ModelShape(60, 52, 128),   # LLaMA 30B
}


def estimated_shape(parameters: int) -> ModelShape:
    """A LLaMA-like shape for ``parameters`` weights without grouped-query attention, plus 25%.

    With dim d and d/128 layers of 12*d^2 weights each, parameters ~ 12 d^3 / 128.
    """
    dim = max(64.0, (parameters * 128 / 12) ** (1 / 3))
    layers = max(1, math.ceil(dim / 128 * 1.25))
    return ModelShape(layers, max(1, round(dim / 128)), 128, exact=False)


def _shape_from_files(folder: Path, variant: Variant) -> ModelShape | None:
    """The exact shape from the model's own files, when they are in the store."""
    names = {f.path.rsplit("/", 1)[-1]: folder / f.path for f in variant.files}
    try:
        if variant.format == "gguf":
            path = next((p for n, p in names.items() if n.endswith(".gguf") and p.is_file()), None)
            if path is None:
                return None
            from pipx_llama.formats.gguf import open_gguf

            g = open_gguf(path)
            try:
                md = g.metadata
                arch = str(md.get("general.architecture", "llama"))
                heads = int(md[f"{arch}.attention.head_count"])
                kv = int(md.get(f"{arch}.attention.head_count_kv", heads))
                head_dim = int(
                    md.get(f"{arch}.attention.key_length", int(md[f"{arch}.embedding_length"]) // heads)
                )
                return ModelShape(int(md[f"{arch}.block_count"]), kv, head_dim)
            finally:
                g.close()
        if "config.json" in names and names["config.json"].is_file():
            c = json.loads(names["config.json"].read_text())
            heads = int(c["num_attention_heads"])
            return ModelShape(int(c["num_hidden_layers"]), int(c.get("num_key_value_heads") or heads),
                              int(c.get("head_dim") or int(c["hidden_size"]) // heads))
        if "params.json" in names and names["params.json"].is_file():
            p = json.loads(names["params.json"].read_text())
            heads = int(p["n_heads"])
            return ModelShape(int(p["n_layers"]), int(p.get("n_kv_heads") or heads), int(p["dim"]) // heads)
    except (OSError, ValueError, KeyError, TypeError, PipxLlamaError):
        return None
    return None


def model_shape(store: Store, manifest: Manifest, variant: Variant) -> ModelShape:
    """The model's shape: from its files in the store, else the table of known models, else an estimate."""
    local = _shape_from_files(store.variant_dir(manifest.name, variant.name), variant)
    if local is not None:
        return local
    return KNOWN_SHAPES.get(manifest.parameters) or estimated_shape(manifest.parameters)
