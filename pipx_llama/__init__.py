"""pipx-llama: fetch, verify, convert, quantize and run LLaMA-family models with a bundled numba engine."""

from pipx_llama import _numba_cache  # noqa: F401  (must run before any numba import)

__version__ = "0.1.0"
