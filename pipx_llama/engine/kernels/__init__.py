"""numba kernels of the engine, each with a numpy reference twin.

``WEIGHT_KERNELS`` maps a ggml tensor type to the object that multiplies activations by weights
stored in that type (``matmul``) and expands rows of it to float32 (``dequantize``, used for the
token-embedding lookup). Kernel modules register themselves here when imported.

Compiling them all ahead of a first run is :mod:`pipx_llama.engine.warmup`'s job, outside this
package (it loads a model, which imports the kernels).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
from gguf import GGMLQuantizationType

from pipx_llama._numba_cache import guard_saves

guard_saves()  # before any kernel of this package compiles: numba's cache writes, safe between processes


class WeightKernel(Protocol):
    qtype: GGMLQuantizationType

    def matmul(self, w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
        """out[t, r] = dot(row r of w, x[t]).

        w: uint8 [rows, row_bytes] raw ggml blocks (often a read-only mmap view);
        x: float32 [T, n] C-contiguous activations; out: float32 [T, rows], preallocated.
        """

    def dequantize(self, w: np.ndarray, out: np.ndarray) -> None:
        """w: uint8 [k, row_bytes] -> out: float32 [k, n], preallocated."""


WEIGHT_KERNELS: dict[GGMLQuantizationType, WeightKernel] = {}


def register(kernel: WeightKernel) -> WeightKernel:
    WEIGHT_KERNELS[kernel.qtype] = kernel
    return kernel


__all__ = ["WEIGHT_KERNELS", "WeightKernel", "register"]
