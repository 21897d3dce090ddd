"""Convert original checkpoints to GGUF: Meta's ``consolidated.NN.pth`` folders and Hugging Face folders.

``convert(src_dir, out_path, outtype)`` recognises the folder's format, validates it, reads its
tokenizer and writes a GGUF v3 file in F32, F16, BF16 or Q8_0, one tensor in memory at a time, as
llama.cpp's converters write it: Meta's checkpoints as ``llama``, Hugging Face folders of Llama,
Qwen2/2.5, Qwen3, Gemma 2/3 and Phi-3 as their own architectures. Modules: ``torchzip`` (torch zip
archives through a restricted unpickler), ``meta`` (shards, merging), ``hf`` (safetensors, the
generic Hugging Face path), ``families`` (what each Hugging Face family does differently),
``vocab`` (tokenizer metadata), ``writer`` (GGUF output).
"""

from __future__ import annotations

from pathlib import Path

from pipx_llama.convert.hf import read_hf_model
from pipx_llama.convert.meta import read_meta_checkpoint
from pipx_llama.convert.torchzip import ConvertSecurityError
from pipx_llama.convert.vocab import spm_vocab
from pipx_llama.convert.writer import OUTTYPES, ConvertResult, model_metadata, outtype_from_name, write_gguf
from pipx_llama.errors import ModelFileError, UsageError
from pipx_llama.events import EventCallback

__all__ = ["OUTTYPES", "ConvertResult", "ConvertSecurityError", "convert", "detect_format"]


def detect_format(src: str | Path) -> str:
    """``"meta"`` for consolidated.NN.pth + params.json, ``"hf"`` for config.json + safetensors."""
    src = Path(src)
    if not src.is_dir():
        raise UsageError(f"{src} is not a folder", "give the folder that holds the model's files")
    if (src / "params.json").is_file() and any(src.glob("consolidated.*.pth")):
        return "meta"
    if (src / "config.json").is_file():
        return "hf"
    raise ModelFileError(
        f"{src} holds neither a Meta checkpoint (consolidated.00.pth + params.json) "
        "nor a Hugging Face model (config.json + model.safetensors)",
        "point to the folder of one model",
    )


def convert(
    src_dir: str | Path,
    out_path: str | Path,
    outtype: str = "f16",
    on_event: EventCallback | None = None,
) -> ConvertResult:
    """Convert the model in ``src_dir`` to a GGUF file at ``out_path`` (written atomically)."""
    src = Path(src_dir)
    qtype = outtype_from_name(outtype)
    fmt = detect_format(src)
    if fmt == "meta":
        ckpt = read_meta_checkpoint(src)
        vocab = spm_vocab(ckpt.tokenizer_model, src)
        if len(vocab.tokens) != ckpt.params.n_vocab:
            raise ModelFileError(
                f"{ckpt.tokenizer_model} has {len(vocab.tokens)} tokens but tok_embeddings has "
                f"{ckpt.params.n_vocab} rows",
                "the tokenizer does not belong to this checkpoint",
            )
        params, tensors = ckpt.params, ckpt.tensors
    else:
        model = read_hf_model(src)
        params, tensors, vocab = model.params, model.tensors, model.vocab
    result = write_gguf(out_path, params, vocab, tensors, qtype, model_metadata(src, tensors), on_event)
    result.source_format = fmt
    return result
