"""The KV cache of one sequence: per layer, the keys and values of every position it still needs.

Float16, as llama.cpp keeps it. A global layer keeps every position (``n_ctx`` rows, position p in
row p). A sliding-window layer (Gemma 2/3) only ever reads the last ``window`` positions, so it
keeps ``window + n_batch`` rows as a ring, position p in row p % rows: a batch of up to n_batch
tokens writes its keys without overwriting any its first token still reads. All layers live in one
flat buffer per K and V (what the fused pass indexes through its layer table).

Each of K and V is float16 or, on request (``--cache-type-k/-v q8_0``, llama.cpp's names), ggml's
q8_0 blocks in a uint8 buffer (34 bytes per 32 values: about half of float16); see kernels.attention.

Keys carry their position's rotation; ``shift`` re-rotates the keys it moves (RoPE rotations
compose), so a context shift recomputes nothing.
"""

from __future__ import annotations

import numpy as np

from pipx_llama.engine.arch.base import ROPE_NEOX, HyperParams
from pipx_llama.engine.kernels.attention import q8_0_load_ref, q8_0_store_row_ref
from pipx_llama.errors import ContextFullError, UsageError


def layer_rows(hp: HyperParams, n_ctx: int, n_batch: int) -> list[int]:
    """Rows of each layer's cache: n_ctx, or window + n_batch for a sliding-window layer."""
    return [min(n_ctx, hp.swa_window + n_batch) if hp.is_swa(li) else n_ctx for li in range(hp.n_layers)]


CACHE_TYPES = ("f16", "q8_0")


def check_cache_type(cache_type: str, head_dim: int, which: str = "K") -> None:
    """Refuse a cache type this engine does not have, or q8_0 for heads not made of 32-value blocks."""
    if cache_type not in CACHE_TYPES:
        raise UsageError(f"unknown {which} cache type {cache_type!r}",
                         f"use one of: {', '.join(CACHE_TYPES)}")
    if cache_type == "q8_0" and head_dim % 32:
        raise UsageError(f"a q8_0 {which} cache needs a head size that is a multiple of 32; this model's is "
                         f"{head_dim}", f"use --cache-type-{which.lower()} f16")


def row_bytes(head_dim: int, cache_type: str) -> int:
    """Bytes of one KV head of one position."""
    return head_dim // 32 * 34 if cache_type == "q8_0" else 2 * head_dim


def kv_cache_bytes(hp: HyperParams, n_ctx: int, n_batch: int = 256, type_k: str = "f16",
                   type_v: str = "f16") -> int:
    """Bytes of K and V for a context of ``n_ctx`` with these cache types (what a planner counts)."""
    per_row = hp.n_kv_heads * (row_bytes(hp.head_dim, type_k) + row_bytes(hp.head_dim, type_v))
    return sum(layer_rows(hp, n_ctx, n_batch)) * per_row


def _buffer(rows: int, hp: HyperParams, cache_type: str) -> np.ndarray:
    if cache_type == "q8_0":
        return np.zeros(rows * hp.n_kv_heads * row_bytes(hp.head_dim, cache_type), np.uint8)
    return np.zeros(rows * hp.n_kv_heads * hp.head_dim, np.float16)


class KVCache:
    """K and V of every layer: ``k_layer(li)`` / ``v_layer(li)`` are float16 [rows, n_kv_heads, head_dim],
    or uint8 [rows, n_kv_heads, head_dim/32*34] q8_0 rows."""

    def __init__(self, hp: HyperParams, n_ctx: int, n_batch: int, type_k: str = "f16", type_v: str = "f16",
                 buffers: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """``buffers``: flat K and V arrays to hold the cache (a slot of a pool several sequences share),
        of the size and dtype this cache would allocate."""
        check_cache_type(type_k, hp.head_dim, "K")
        check_cache_type(type_v, hp.head_dim, "V")
        self.hp = hp
        self.n_ctx = n_ctx
        self.type_k, self.type_v = type_k, type_v
        self.rows = layer_rows(hp, n_ctx, n_batch)
        self.row_offsets = [0]  # first cache row of each layer (both caches)
        for r in self.rows:
            self.row_offsets.append(self.row_offsets[-1] + r)
        self.k = _buffer(self.row_offsets[-1], hp, type_k)
        self.v = _buffer(self.row_offsets[-1], hp, type_v)
        if buffers is not None:
            for mine, given in zip((self.k, self.v), buffers):
                if given.shape != mine.shape or given.dtype != mine.dtype:
                    raise ValueError(f"KV buffer {given.dtype} {given.shape} does not fit "
                                     f"{mine.dtype} {mine.shape}")
            self.k, self.v = buffers
        self.windows = [hp.swa_window if hp.is_swa(li) else 0 for li in range(hp.n_layers)]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def _view(self, flat: np.ndarray, li: int) -> np.ndarray:
        per = flat.size // self.row_offsets[-1]
        part = flat[self.row_offsets[li] * per : self.row_offsets[li + 1] * per]
        return part.reshape(self.rows[li], self.hp.n_kv_heads, per // self.hp.n_kv_heads)

    def k_layer(self, li: int) -> np.ndarray:
        return self._view(self.k, li)

    def v_layer(self, li: int) -> np.ndarray:
        return self._view(self.v, li)

    def keeps(self, n_past: int, n: int) -> bool:
        """Whether, with n_past positions written, the first n can be kept and evaluation go on from n:
        every ring must still hold the window of position n."""
        for rows, window in zip(self.rows, self.windows):
            if window and max(0, n - window + 1) < n_past - rows and n > 0:
                return False
        return True

    def shift(self, n_past: int, n_keep: int, n_discard: int) -> None:
        """Drop positions n_keep..n_keep+n_discard-1 and move the later ones down, re-rotating their keys."""
        hp = self.hp
        new_n = n_past - n_discard
        for li, (rows, window) in enumerate(zip(self.rows, self.windows)):
            base = hp.rope_base_swa if window else hp.rope_base
            scale = hp.rope_freq_scale_swa if window else hp.rope_freq_scale
            factors = None if window else hp.factors_for(self.n_ctx)
            k, v = self.k_layer(li), self.v_layer(li)
            if not window:
                src, n_move = n_keep + n_discard, n_past - n_keep - n_discard
                k[n_keep : n_keep + n_move] = _rotate(k[src : src + n_move], -n_discard, hp, base, scale,
                                                      factors)
                v[n_keep : n_keep + n_move] = v[src : src + n_move]
                continue
            # a ring: rebuild the rows of the positions that stay (all of them, at most `rows`)
            new = np.arange(max(0, new_n - rows), new_n)
            old = np.where(new < n_keep, new, new + n_discard)
            present = old >= n_past - rows
            needed = new >= new_n - window + 1
            if (needed & ~present).any():
                raise ContextFullError(
                    f"a context shift keeping {n_keep} tokens needs keys this model's sliding-window "
                    "layers no longer hold", "keep fewer tokens (--keep), or raise -c/--ctx-size")
            new, old = new[present], old[present]
            moved = old >= n_keep
            ks, vs = k[old % rows].copy(), v[old % rows].copy()
            ks[moved] = _rotate(ks[moved], -n_discard, hp, base, scale, None)
            k[new % rows], v[new % rows] = ks, vs


def _rotate(keys: np.ndarray, delta: int, hp: HyperParams, base: float, freq_scale: float,
            factors: tuple[float, ...] | None) -> np.ndarray:
    """Keys [n, n_kv_heads, head_dim] rotated by ``delta`` positions (float64, rounded to the cache's type).

    q8_0 keys are dequantized, rotated and quantized again, as llama.cpp shifts a quantized K cache.
    """
    if keys.dtype == np.uint8:
        rotated = _rotate(q8_0_load_ref(keys), delta, hp, base, freq_scale, factors)
        return q8_0_store_row_ref(rotated.reshape(-1)).reshape(keys.shape)
    half = hp.n_rot // 2
    theta = freq_scale * base ** (-2.0 * np.arange(half) / hp.n_rot) * delta
    if factors is not None:
        theta /= np.asarray(factors)
    cos, sin = np.cos(theta), np.sin(theta)
    k = keys.astype(np.float64)
    if hp.rope_type == ROPE_NEOX:
        first, second = slice(0, half), slice(half, hp.n_rot)
    else:
        first, second = slice(0, hp.n_rot, 2), slice(1, hp.n_rot, 2)
    x0, x1 = k[..., first].copy(), k[..., second].copy()
    k[..., first] = x0 * cos - x1 * sin
    k[..., second] = x0 * sin + x1 * cos
    return k.astype(keys.dtype)


def check_shift(n_past: int, n_keep: int, n_discard: int) -> None:
    if not (0 <= n_keep and 0 < n_discard and n_keep + n_discard <= n_past):
        raise UsageError(f"cannot drop {n_discard} positions after {n_keep} of {n_past}",
                         "keep + discard must fit the cached positions")
