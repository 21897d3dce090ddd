"""phi3: Phi-3, Phi-3.5 and Phi-4-mini.

q, k and v come in one tensor (``attn_qkv``) and gate and up in one (``ffn_up``: gate rows first,
as ggml_swiglu splits it); both are split by rows when the model loads. RoPE on head halves, over
``rope.dimension_count`` dimensions (Phi-4-mini rotates three quarters of each head). LongRoPE:
``rope_factors_short``/``rope_factors_long`` per-pair factors, the long ones for contexts beyond
``rope.scaling.original_context_length``, and cos/sin scaled by ``rope.scaling.attn_factor``. q is
scaled by 1/sqrt(head_dim) before attention. llama.cpp ignores Phi-3's sliding window (its
converter writes it wrongly), and so do we (``src/models/phi3.cpp``).
"""

import dataclasses

import numpy as np

from pipx_llama.engine.arch.base import ROPE_NEOX, Family, HyperParams, Meta


def _phi3(m: Meta, hp: HyperParams) -> HyperParams:
    q_scale = float(np.float32(1.0) / np.sqrt(np.float32(hp.head_dim)))
    return dataclasses.replace(hp, q_scale=q_scale, kq_scale=1.0)


PHI3 = Family(names=("phi3",), examples="Phi-3, Phi-3.5, Phi-4-mini", rope_type=ROPE_NEOX, fused_qkv=True,
              fused_gate_up=True, extra=_phi3)
