"""llama: Llama 1/2/3, Mistral 7B, TinyLlama, SmolLM2 -- the reference every other family varies.

RoPE on consecutive pairs (llama.cpp's converter permutes Hugging Face's q/k rows into that order),
SwiGLU, no biases, no extra norms; ``rope_freqs.weight`` carries Llama 3.1's per-pair factors.
"""

from pipx_llama.engine.arch.base import ROPE_NORM, Family

LLAMA = Family(names=("llama",), examples="Llama, Llama 2, Llama 3.x, TinyLlama, Mistral, SmolLM2",
               rope_type=ROPE_NORM)
