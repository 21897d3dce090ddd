"""pipx-llama: fetch, verify, convert, quantize and run LLaMA-family models with a bundled numba engine."""

import os

from pipx_llama import _numba_cache  # noqa: F401  (must run before any numba import)

# numba's OpenMP threads otherwise spin between the hundreds of parallel regions of each token; when
# another process holds a core, the spinning thread starves the one it waits for. SmolLM2, 2 threads,
# 2-core machine: with one core busy, 1.8 tok/s spinning vs 78 passive; idle, 245-261 vs 207-213.
# A dedicated machine can take the spinning back with OMP_WAIT_POLICY=ACTIVE.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
