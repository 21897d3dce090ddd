"""qwen2: Qwen2, Qwen2.5 (and Coder), the DeepSeek-R1 distills built on them.

The llama layer with biases on q, k and v (loaded wherever the file has them) and RoPE on the two
halves of each head (llama.cpp's ``src/models/qwen2.cpp``).
"""

from pipx_llama.engine.arch.base import ROPE_NEOX, Family

QWEN2 = Family(names=("qwen2",), examples="Qwen2, Qwen2.5, Qwen2.5-Coder, DeepSeek-R1-Distill-Qwen",
               rope_type=ROPE_NEOX)
