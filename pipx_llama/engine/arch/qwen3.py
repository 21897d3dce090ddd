"""qwen3: Qwen3 dense models.

Like Qwen2 without the q/k/v biases, with an RMSNorm over each head of q and of k before RoPE
(``attn_q_norm``/``attn_k_norm``, one weight of head_dim values shared by the heads; llama.cpp's
``src/models/qwen3.cpp``). Qwen3 heads may be wider than dim/heads: ``attention.key_length`` says.
"""

from pipx_llama.engine.arch.base import ROPE_NEOX, Family

QWEN3 = Family(names=("qwen3",), examples="Qwen3 (dense)", rope_type=ROPE_NEOX, qk_norm=True)
