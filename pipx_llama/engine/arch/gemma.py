"""gemma2 and gemma3: Google's Gemma 2 and Gemma 3 text models.

Both scale the embeddings by sqrt(dim), normalise each block's output before the residual add
(``attn_post_norm``, ``ffn_post_norm``), use GeGLU, scale q before attention instead of q·k, and
alternate sliding-window and global layers (llama.cpp's ``src/models/gemma2.cpp``, ``gemma3.cpp``):

- Gemma 2: every other layer slides over 4096 positions; attention logits are soft-capped at 50 and
  the final logits at 30 (``attn_logit_softcapping``, ``final_logit_softcapping``).
- Gemma 3: five sliding layers (window from the file) then a global one; q and k get a per-head
  RMSNorm; the sliding layers rotate with their own base (``rope.freq_base_swa``, 10000 by default);
  no attention soft-capping, final soft-capping only where the file asks for it.

The RMSNorm weights in a GGUF already include Gemma's ``1 +`` offset (the converter adds it).
"""

import dataclasses

from pipx_llama.engine.arch.base import (
    ACT_GELU,
    ROPE_NEOX,
    Family,
    HyperParams,
    Meta,
    gemma_q_scale,
    with_swa,
)


def _gemma2(m: Meta, hp: HyperParams) -> HyperParams:
    hp = with_swa(m, hp, m.int("attention.sliding_window", 4096), 2)
    hp = dataclasses.replace(hp, rope_base_swa=m.float("rope.freq_base_swa", hp.rope_base),
                             rope_freq_scale_swa=hp.rope_freq_scale)
    return dataclasses.replace(hp, attn_softcap=m.float("attn_logit_softcapping", 50.0),
                               final_softcap=m.float("final_logit_softcapping", 30.0),
                               q_scale=gemma_q_scale(hp, 46), kq_scale=1.0)


def _gemma3(m: Meta, hp: HyperParams) -> HyperParams:
    window = m.int("attention.sliding_window", 0)
    if window > 0:
        hp = with_swa(m, hp, window, 6)
    return dataclasses.replace(hp, final_softcap=m.float("final_logit_softcapping", 0.0),
                               q_scale=gemma_q_scale(hp, 62), kq_scale=1.0)


_COMMON = {"rope_type": ROPE_NEOX, "post_norms": True, "embed_scale": True, "activation": ACT_GELU}
GEMMA2 = Family(names=("gemma2",), examples="Gemma 2", extra=_gemma2, **_COMMON)
GEMMA3 = Family(names=("gemma3",), examples="Gemma 3 (text)", qk_norm=True, extra=_gemma3, **_COMMON)
