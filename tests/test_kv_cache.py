"""The KV cache's layout and size for each cache type (f16, q8_0), rings included."""

from __future__ import annotations

import numpy as np
import pytest
from tinymodel import write_tiny_model

from pipx_llama.engine.kv_cache import KVCache, kv_cache_bytes
from pipx_llama.engine.model import load_model
from pipx_llama.errors import UsageError


@pytest.fixture(scope="module")
def hp(tmp_path_factory):
    path = tmp_path_factory.mktemp("kv") / "gemma3.gguf"  # heads of 32, sliding-window layers (rings)
    write_tiny_model(path, arch="gemma3", seed=3, n_layers=3, tied=False, dim=128)
    m = load_model(path, threads=1)
    yield m.hparams
    m.close()


@pytest.mark.parametrize("types", [("f16", "f16"), ("q8_0", "q8_0"), ("q8_0", "f16"), ("f16", "q8_0")])
def test_size_is_what_the_planner_counts(hp, types):
    kv = KVCache(hp, 128, 16, *types)
    assert kv.nbytes == kv_cache_bytes(hp, 128, 16, *types)
    rows = sum(kv.rows)
    per_head = {"f16": 2 * hp.head_dim, "q8_0": hp.head_dim // 32 * 34}
    assert kv.nbytes == rows * hp.n_kv_heads * (per_head[types[0]] + per_head[types[1]])


def test_q8_0_layers_are_block_rows(hp):
    kv = KVCache(hp, 128, 16, "q8_0", "f16")
    for li, rows in enumerate(kv.rows):
        k, v = kv.k_layer(li), kv.v_layer(li)
        assert k.dtype == np.uint8 and k.shape == (rows, hp.n_kv_heads, hp.head_dim // 32 * 34)
        assert v.dtype == np.float16 and v.shape == (rows, hp.n_kv_heads, hp.head_dim)
    k0, k1 = kv.k_layer(0), kv.k_layer(1)  # layers do not overlap
    k0[...] = 1
    assert not k1.any()


def test_unknown_types_are_refused(hp):
    with pytest.raises(UsageError, match="q4_0"):
        KVCache(hp, 64, 16, "q4_0", "f16")
