"""Tokenizer metadata for a converted model, written as llama.cpp's converters write it.

Two sources, tried in llama.cpp's order (``LlamaModel.set_vocab`` in convert_hf_to_gguf.py):

- ``tokenizer.model`` (SentencePiece): every piece, its score and its type (normal, unknown, control,
  unused, byte) read through the ``sentencepiece`` library exactly as ``_create_vocab_sentencepiece``
  does, including ``added_tokens.json`` and ``tokenizer_config.json``'s ``added_tokens_decoder``;
  ``tokenizer.ggml.model = "llama"``, ``pre = "default"``.
- ``tokenizer.json`` with a byte-level BPE model: tokens and types as ``get_vocab_base`` builds them,
  the merges, and the pre-tokenizer name found the way ``get_vocab_base_pre`` finds it -- tokenize a
  fixed check string, hash the ids, look the hash up in llama.cpp's table. llama.cpp tokenizes with
  Hugging Face ``transformers``; here the tokenizer.json pipeline (normalizer, pre-tokenizer, BPE,
  post-processor) is interpreted directly, for the components byte-level BPE models use.

Special token ids, add-BOS/EOS flags, merges and the chat template come from gguf-py's own
``SpecialVocab`` (the class llama.cpp's converters call), plus ``LlamaModel``'s two extra rules
(``add_prefix_space`` from tokenizer_config.json; no BOS for 49152-token vocabularies).
"""

from __future__ import annotations

import json
import logging
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

import gguf
import regex
import sentencepiece

from pipx_llama.errors import ModelFileError, UnsupportedModelError
from pipx_llama.tokenizer.bpe import BYTE_ENCODER

# gguf-py's SpecialVocab and Metadata log through these; a library must not print through logging's
# last-resort handler, so they get a NullHandler (an application may still attach its own).
for _name in ("gguf", "metadata"):
    logging.getLogger(_name).addHandler(logging.NullHandler())

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# convert_hf_to_gguf.py get_vocab_base_pre: the check text whose token ids identify a pre-tokenizer.
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ "
    "🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# chkhsh -> tokenizer.ggml.pre, from llama.cpp's table (later lines win, as its chain of ifs does),
# limited to the pre-tokenizers pipx-llama's tokenizer implements.
PRE_BY_HASH: dict[str, str] = dict([  # noqa: C406 -- a list: a hash may repeat, the later line wins
    ("0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5", "llama-bpe"),
    ("049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754", "deepseek-llm"),
    ("347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821", "deepseek-coder"),
    ("8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed", "falcon"),
    ("9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e", "falcon3"),
    ("b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166", "mpt"),
    ("35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34", "starcoder"),
    ("3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454", "gpt-2"),
    ("32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3", "stablelm2"),
    ("6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff", "refact"),
    ("9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8", "command-r"),
    ("e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea", "qwen2"),
    ("b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166", "olmo"),
    ("a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e", "dbrx"),
    ("c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d", "smaug-bpe"),
    ("c7ea5862a53e4272c035c8238367063e2b270d51faa48c0f09e9d5b54746c360", "poro-chat"),
    ("7fc505bd3104ca1083b150b17d088b59534ede9bde81f0dd2090967d7fe52cee", "viking"),
    ("b53802fb28e26d645c3a310b34bfe07da813026ec7c7716883404d5e0f8b1901", "jais"),
    ("7b3e7548e4308f52a76e8229e4e6cc831195d0d1df43aed21ac6c93da05fec5f", "codeshell"),
    ("63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e", "tekken"),
    ("855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249", "smollm"),
    ("3c30d3ad1d6b64202cd222813e7736c2db6e1bd6d67197090fc1211fbc612ae7", "bloom"),
    ("bc01ce58980e1db43859146dc51b1758b3b88729b217a74792e9f8d43e479d21", "gpt3-finnish"),
    ("4e2b24cc4770243d65a2c9ec19770a72f08cffc161adbb73fcbb6b7dd45a0aae", "exaone"),
    ("fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085", "phi-2"),
    ("8b5a93ed704057481f240da0be7e7dca721d7f8f4755263b6807227a2cbeae65", "roberta-bpe"),
    ("ad851be1dba641f2e3711822f816db2c265f788b37c63b4e1aeacb9ee92de8eb", "gigachat"),
    ("d4c8f286ea6b520b3d495c4455483cfa2302c0cfcd4be05d781b6a8a0a7cdaf1", "megrez"),
    ("877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5", "deepseek-v3"),
    ("b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5", "deepseek-r1-qwen"),
    ("ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e", "gpt-4o"),
    ("1994ffd01900cfb37395608534236ecd63f2bd5995d6cb1004dda1af50240f15", "trillion"),
    ("96a5f08be6259352137b512d4157e333e21df7edd3fcd152990608735a65b224", "bailingmoe"),
    ("d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406", "llama4"),
    ("0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3", "pixtral"),
    ("d5f1dd6f980fec569fb218a81a7658ac45fc56b38c5a0adeb1c232fbe04ef5ec", "seed-coder"),
    ("b0a6b1c0bd5998ebd9df08611efde34a4ff03faed45ae09c43e6b31ebd4b94cf", "a.x-4.0"),
    ("f6791d196f87ce6b56a7d234be618e0d58f8cda3549416635b2bebcd22cd95c4", "midm-2.0"),
    ("169bf0296a13c4d9b7672313f749eb36501d931022de052aad6e36f2bf34dd51", "lfm2"),
    ("2085e1638f6c377a0aa4ead21b27bb4cb941bf800df86ed391011769c1758dfb", "exaone4"),
    ("a1e163ecab2e718a4c829d1148b6e86824ec36163bb71941c3dca9cd5ac25756", "mellum"),
    ("1431a23e583c97432bc230bff598d103ddb5a1f89960c8f1d1051aaa944d0b35", "minerva-7b"),
    ("a6b57017d60e6edb4d88ecc2845188e0eb333a70357e45dcc9b53964a73bbae6", "falcon-h1"),
    ("60476e1243776c4fb1b993dbd7a5f15ac22f83c80afdf425fa5ae01c8d44ef86", "falcon-h1"),
    ("3eda48b4c4dc7de733d1a8b3e3b4a85243dbbf704da2ee9d42c6beced8897896", "falcon-h1"),
    ("48f8e02c0359c0bbdd82f26909171fac1c18a457bb47573ed1fe3bbb2c1cfd4b", "falcon-h1"),
    ("0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4", "gpt-2"),
    ("d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c", "qwen2"),
])  # fmt: skip

# The GPT-2 split that Hugging Face's ByteLevel pre-tokenizer applies when use_regex is set.
_BYTELEVEL_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


@dataclass
class Vocab:
    """Everything ``tokenizer.ggml.*`` holds for one model, ready to be written."""

    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    special_ids: dict[str, int] = field(default_factory=dict)  # "bos" -> id, in SpecialVocab's order
    add_special: dict[str, bool] = field(default_factory=dict)  # "bos" -> add it, likewise
    add_space_prefix: bool | None = None
    chat_template: str | list[dict[str, str]] | None = None

    def add_to_gguf(self, w: gguf.GGUFWriter) -> None:
        """The keys in the order llama.cpp's converters add them."""
        w.add_tokenizer_model(self.model)
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        w.add_token_types(self.token_types)
        if self.merges:
            w.add_token_merges(self.merges)
        for typ, tid in self.special_ids.items():
            handler = getattr(w, f"add_{typ}_token_id", None)
            if handler is not None:
                handler(tid)
        for typ, value in self.add_special.items():
            handler = getattr(w, f"add_add_{typ}_token", None)
            if handler is not None:
                handler(value)
        if self.chat_template is not None:
            w.add_chat_template(self.chat_template)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFileError(
            f"cannot read {path}: {err}", "check that the file is complete and valid JSON"
        ) from err


def _special_vocab(model_dir: Path, *, load_merges: bool, n_vocab: int | None) -> gguf.SpecialVocab:
    try:
        return gguf.SpecialVocab(model_dir, load_merges=load_merges, n_vocab=n_vocab)
    except (ValueError, TypeError, KeyError, AttributeError, json.JSONDecodeError) as err:
        raise ModelFileError(
            f"{model_dir}: the tokenizer files (tokenizer.json / tokenizer_config.json / config.json) "
            f"could not be read: {err}",
            "check that the model folder is complete",
        ) from err


_SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")


def add_special_flags(model_dir: Path) -> dict[str, bool]:
    """``tokenizer.ggml.add_*_token`` as the gguf-py in llama.cpp's own tree decides them.

    That version (newer than gguf 0.19 on PyPI) reads tokenizer.json's post-processor first -- a
    ByteLevel step means no BOS and no EOS, Roberta's adds BOS, EOS and SEP, a template adds what it
    starts and ends with -- and lets tokenizer_config.json's ``add_*_token`` fill in only what the
    post-processor left open.
    """
    tj_path, tc_path = model_dir / "tokenizer.json", model_dir / "tokenizer_config.json"
    tokenizer = _read_json(tj_path) if tj_path.is_file() else None
    config = _read_json(tc_path) if tc_path.is_file() else None
    add: dict[str, bool] = {}
    if tokenizer:
        cfg = dict(config or {})
        bos, cls, eos, sep = (cfg.get(k) for k in ("bos_token", "cls_token", "eos_token", "sep_token"))
        bos = bos if bos or not (cls and config) else cls
        eos = eos if eos or not (sep and config) else sep
        post = tokenizer.get("post_processor") or {}
        for proc in post.get("processors", [post]) if post else []:
            kind = proc.get("type")
            if kind == "ByteLevel":
                add.setdefault("bos", False)
                add.setdefault("eos", False)
            elif kind == "RobertaProcessing":
                add.update(bos=True, eos=True, sep=True)
            elif kind == "TemplateProcessing":
                single, pair = proc.get("single", []), proc.get("pair", [])
                first = last = None
                if len(single) > 1:
                    if first := single[0].get("SpecialToken", {}).get("id"):
                        if not config:
                            bos = first
                        elif first not in (bos, cls):
                            bos, cls = bos or first, cls or first
                        add["bos"] = first in (bos, cls)
                    if last := single[-1].get("SpecialToken", {}).get("id"):
                        if not config or last != eos:
                            eos = last
                        add["eos"] = True
                if pair:
                    start = 1 if first and pair[0].get("SpecialToken", {}).get("id") == first else 0
                    stop = -1 if last and pair[-1].get("SpecialToken", {}).get("id") == last else None
                    middle = pair[start:stop]
                    if middle and middle[0].get("Sequence", {}).get("id") == "A" and \
                            middle[-1].get("Sequence", {}).get("id") == "B" and (middle := middle[1:-1]):
                        add_sep = False
                        entry = middle[0].get("SpecialToken", {}).get("id")
                        if entry and entry in (sep, eos) and not last:
                            add_sep = True
                        if len(middle) == 2:
                            entry = middle[1].get("SpecialToken", {}).get("id")
                            if entry and entry in (sep, eos):
                                add_sep = True
                        add["sep"] = add_sep
    if not config:
        return add
    for typ in _SPECIAL_TYPES:
        value = config.get(f"add_{typ}_token")
        if isinstance(value, bool) and typ not in add:
            add[typ] = value
    return add


def looks_special(token: str) -> bool:
    """convert_hf_to_gguf.py ``does_token_look_special``."""
    if token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]"):
        return True
    return (
        (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _load_sp(tokenizer_model: Path) -> sentencepiece.SentencePieceProcessor:
    sp = sentencepiece.SentencePieceProcessor()
    try:
        data = tokenizer_model.read_bytes()
        sp.LoadFromSerializedProto(data)
    except (OSError, RuntimeError) as err:
        raise ModelFileError(
            f"{tokenizer_model} is not a SentencePiece model: {err}",
            "Llama 3's tiktoken-style tokenizer.model is not supported; Llama 1/2 need their original file",
        ) from err
    return sp


def _sp_pieces(
    sp: sentencepiece.SentencePieceProcessor, vocab_size: int
) -> tuple[list[str], list[float], list[int]]:
    """Every piece, its score and type, padded with unused ``[PADn]`` entries up to ``vocab_size``."""
    n_sp = sp.vocab_size()
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [UNUSED] * vocab_size
    for i in range(min(n_sp, vocab_size)):
        if sp.IsUnknown(i):
            typ = UNKNOWN
        elif sp.IsControl(i):
            typ = CONTROL
        elif sp.IsUnused(i):
            typ = UNUSED
        elif sp.IsByte(i):
            typ = BYTE
        else:
            typ = NORMAL
        tokens[i], scores[i], types[i] = sp.IdToPiece(i), sp.GetScore(i), typ
    return tokens, scores, types


def spm_vocab(tokenizer_model: Path, model_dir: Path, vocab_size: int | None = None,
              llama_defaults: bool = True) -> Vocab:
    """The vocabulary of a SentencePiece ``tokenizer.model`` (``_create_vocab_sentencepiece``).

    ``llama_defaults`` fills in the SentencePiece model's own BOS/EOS/UNK ids and llama.cpp's add-BOS
    default where the folder does not name them (Meta's layout has no tokenizer_config.json); other
    families get exactly what ``gguf.SpecialVocab`` finds, as llama.cpp's converter writes.
    """
    sp = _load_sp(tokenizer_model)
    if vocab_size is None:
        vocab_size = sp.vocab_size()
    tokens, scores, types = _sp_pieces(sp, vocab_size)

    added_file = model_dir / "added_tokens.json"
    if added_file.is_file():
        for text, tid in _read_json(added_file).items():
            if isinstance(tid, int) and 0 <= tid < vocab_size:
                tokens[tid], scores[tid], types[tid] = text, -1000.0, USER_DEFINED
    config_file = model_dir / "tokenizer_config.json"
    if config_file.is_file():
        decoder = _read_json(config_file).get("added_tokens_decoder", {})
        for key, data in decoder.items():
            tid = int(key)
            if not 0 <= tid < vocab_size:
                continue
            text = data["content"]
            if data.get("special") or looks_special(text):
                types[tid] = CONTROL
            else:
                text = text.replace("▁", " ")
                types[tid] = USER_DEFINED
            scores[tid], tokens[tid] = -1000.0, text

    sv = _special_vocab(model_dir, load_merges=False, n_vocab=len(tokens))
    special_ids = dict(sv.special_token_ids)
    add_special = dict(sv.add_special_token) if llama_defaults else add_special_flags(model_dir)
    if llama_defaults:
        # Folders without tokenizer_config.json (Meta's original layout) leave these to llama.cpp's SPM
        # defaults; writing the SentencePiece model's own ids and llama.cpp's defaults says the
        # same, explicitly.
        for typ, tid in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unk", sp.unk_id())):
            if typ not in special_ids and 0 <= tid < vocab_size:
                special_ids[typ] = tid
        add_special.setdefault("bos", True)
        add_special.setdefault("eos", False)
    return Vocab(
        model="llama", pre="default", tokens=tokens, token_types=types, scores=scores,
        special_ids=special_ids, add_special=add_special, chat_template=sv.chat_template,
    )


def bpe_vocab(model_dir: Path, vocab_size: int | None = None, current_rules: bool = False) -> Vocab:
    """The vocabulary of a byte-level BPE ``tokenizer.json`` (``_set_vocab_gpt2`` / ``get_vocab_base``).

    ``current_rules``: the add-BOS/EOS flags of llama.cpp's current gguf-py (``add_special_flags``).
    """
    path = model_dir / "tokenizer.json"
    tj = _read_json(path)
    try:
        tok = HfTokenizer(tj, str(path))
        full = {str(k): int(v) for k, v in tok.vocab.items()}
        added = {a["content"]: a for a in tj.get("added_tokens") or []}
        for text, a in added.items():
            full[text] = int(a["id"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ModelFileError(
            f"{path} is not a valid tokenizer.json: {err!r}", "check that the file is complete"
        ) from err
    if vocab_size is None:
        vocab_size = len(full)
    if full and max(full.values()) >= vocab_size:
        raise ModelFileError(
            f"{path} has token ids up to {max(full.values())} but the model's vocabulary has {vocab_size} "
            f"entries",
            "check config.json's vocab_size against the tokenizer",
        )
    reverse = {tid: text for text, tid in full.items()}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        text = reverse.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif text in added:
            if added[text].get("special") or looks_special(text):
                types.append(CONTROL)
            else:
                text = text.replace("▁", " ")
                types.append(USER_DEFINED)
            tokens.append(text)
        else:
            tokens.append(text)
            types.append(NORMAL)

    sv = _special_vocab(model_dir, load_merges=True, n_vocab=None)
    if not sv.merges:
        raise ModelFileError(f"{path} has no merges", "a byte-level BPE tokenizer needs its merges list")
    return Vocab(
        model="gpt2", pre=detect_pre(tok), tokens=tokens, token_types=types, merges=list(sv.merges),
        special_ids=dict(sv.special_token_ids),
        add_special=add_special_flags(model_dir) if current_rules else dict(sv.add_special_token),
        chat_template=sv.chat_template,
    )


def phi3_vocab(model_dir: Path, vocab_size: int | None = None) -> Vocab:
    """Phi-3's vocabulary as convert_hf_to_gguf.py's ``Phi3MiniModel.set_vocab`` builds it.

    A ``GPT2Tokenizer`` (Phi-4-mini) is byte-level BPE. Otherwise the SentencePiece pieces, then the
    added tokens of added_tokens.json, tokenizer_config.json and tokenizer.json, each CONTROL when it
    is marked special and USER_DEFINED when not -- unlike LLaMA's rules, without guessing from the text
    and without turning ``▁`` into spaces.
    """
    config_file = model_dir / "tokenizer_config.json"
    config = _read_json(config_file) if config_file.is_file() else {}
    if config.get("tokenizer_class") == "GPT2Tokenizer":
        return bpe_vocab(model_dir, vocab_size, current_rules=True)
    tokenizer_model = model_dir / "tokenizer.model"
    if not tokenizer_model.is_file():
        raise ModelFileError(
            f"{model_dir} has no tokenizer.model", "Phi-3 models ship one; copy it into the folder"
        )
    sp = _load_sp(tokenizer_model)
    if vocab_size is None:
        vocab_size = sp.vocab_size()
    tokens, scores, types = _sp_pieces(sp, vocab_size)
    added_file = model_dir / "added_tokens.json"
    if added_file.is_file():
        for text, tid in _read_json(added_file).items():
            if isinstance(tid, int) and 0 <= tid < vocab_size:
                tokens[tid], scores[tid], types[tid] = text, -1000.0, USER_DEFINED
    entries: list[tuple[Path, int, dict[str, Any]]] = [
        (config_file, int(k), v) for k, v in config.get("added_tokens_decoder", {}).items()]
    tokenizer_json = model_dir / "tokenizer.json"
    if tokenizer_json.is_file():
        entries += [
            (tokenizer_json, int(a["id"]), a) for a in _read_json(tokenizer_json).get("added_tokens") or []
        ]
    for source, tid, data in entries:
        if not 0 <= tid < vocab_size:
            raise ModelFileError(f"{source}: added token {data.get('content')!r} has id {tid}, outside the "
                                 f"{vocab_size}-token vocabulary", "check config.json's vocab_size")
        tokens[tid], scores[tid] = data["content"], -1000.0
        types[tid] = CONTROL if data.get("special") else USER_DEFINED
    sv = _special_vocab(model_dir, load_merges=False, n_vocab=len(tokens))
    return Vocab(model="llama", pre="default", tokens=tokens, token_types=types, scores=scores,
                 special_ids=dict(sv.special_token_ids), add_special=add_special_flags(model_dir),
                 chat_template=sv.chat_template)


def load_vocab(model_dir: Path, vocab_size: int | None = None, tokenizer_model: Path | None = None,
               llama_rules: bool = True) -> Vocab:
    """The model's vocabulary: tokenizer.model first, then a byte-level BPE tokenizer.json.

    With ``llama_rules``, ``LlamaModel.set_vocab``'s two llama-specific rules are applied too (other
    families' converters -- Qwen's, Gemma's -- use the base rules only).
    """
    tokenizer_model = tokenizer_model or model_dir / "tokenizer.model"
    if tokenizer_model.is_file():
        vocab = spm_vocab(tokenizer_model, model_dir, vocab_size, llama_defaults=llama_rules)
    elif (model_dir / "tokenizer.json").is_file():
        vocab = bpe_vocab(model_dir, vocab_size, current_rules=not llama_rules)
    else:
        raise ModelFileError(
            f"{model_dir} has neither tokenizer.model nor tokenizer.json",
            "copy the model's tokenizer files into the folder",
        )
    if not llama_rules:
        return vocab
    config_file = model_dir / "tokenizer_config.json"
    if config_file.is_file():
        prefix = _read_json(config_file).get("add_prefix_space")
        if isinstance(prefix, bool):
            vocab.add_space_prefix = prefix
    if len(vocab.tokens) == 49152:
        # llama.cpp: "Apply to granite small models only" -- also SmolLM's vocabulary size.
        vocab.add_special["bos"] = False
    return vocab


# ---- Hugging Face tokenizer.json, interpreted ----------------------------------------------------

class _Unsupported(Exception):
    pass


Pieces = list[str]


def _split(pattern: regex.Pattern[str], behavior: str, invert: bool) -> Callable[[Pieces], Pieces]:
    """tokenizers' ``Split``: cut each piece at the pattern's matches, keeping them as ``behavior`` says."""
    behavior = behavior.lower()
    if behavior not in ("removed", "isolated", "mergedwithprevious", "mergedwithnext", "contiguous"):
        raise _Unsupported(f"split behavior {behavior}")

    def run(pieces: Pieces) -> Pieces:
        out: Pieces = []
        for piece in pieces:
            segs: list[tuple[bool, str]] = []
            pos = 0
            for m in pattern.finditer(piece):
                s, e = m.span()
                if e == s:
                    continue
                if s > pos:
                    segs.append((invert, piece[pos:s]))
                segs.append((not invert, piece[s:e]))
                pos = e
            if pos < len(piece):
                segs.append((invert, piece[pos:]))
            parts: Pieces = []
            if behavior == "removed":
                parts = [t for is_match, t in segs if not is_match]
            elif behavior == "isolated":
                parts = [t for _, t in segs]
            elif behavior == "mergedwithprevious":
                for is_match, t in segs:
                    if is_match and parts:
                        parts[-1] += t
                    else:
                        parts.append(t)
            elif behavior == "mergedwithnext":
                pending = ""
                for is_match, t in segs:
                    if is_match:
                        pending += t
                    else:
                        parts.append(pending + t)
                        pending = ""
                if pending:
                    parts.append(pending)
            else:
                prev_match = False
                for is_match, t in segs:
                    if is_match and prev_match:
                        parts[-1] += t
                    else:
                        parts.append(t)
                    prev_match = is_match
            out.extend(p for p in parts if p)
        return out

    return run


def _pattern(spec: dict[str, Any]) -> regex.Pattern[str]:
    if "Regex" in spec:
        return regex.compile(spec["Regex"])
    if "String" in spec:
        return regex.compile(regex.escape(spec["String"]))
    raise _Unsupported(f"pattern {spec}")


def _byte_encode(pieces: Pieces) -> Pieces:
    return ["".join(BYTE_ENCODER[b] for b in p.encode("utf-8")) for p in pieces]


def _pre_tokenizer(spec: dict[str, Any] | None) -> Callable[[Pieces], Pieces]:
    if spec is None:
        return lambda pieces: pieces
    kind = spec.get("type")
    if kind == "Sequence":
        steps = [_pre_tokenizer(s) for s in spec.get("pretokenizers", [])]

        def run(pieces: Pieces) -> Pieces:
            for step in steps:
                pieces = step(pieces)
            return pieces

        return run
    if kind == "Split":
        return _split(_pattern(spec["pattern"]), spec.get("behavior", "Isolated"), bool(spec.get("invert")))
    if kind == "Digits":
        digits = regex.compile(r"\p{N}" if spec.get("individual_digits") else r"\p{N}+")
        return _split(digits, "isolated", False)
    if kind == "ByteLevel":
        gpt2 = (
            _split(regex.compile(_BYTELEVEL_REGEX), "isolated", False)
            if spec.get("use_regex", True)
            else None
        )
        prefix = bool(spec.get("add_prefix_space"))

        def run(pieces: Pieces) -> Pieces:
            if prefix:
                pieces = [p if p.startswith(" ") else " " + p for p in pieces]
            if gpt2 is not None:
                pieces = gpt2(pieces)
            return _byte_encode(pieces)

        return run
    raise _Unsupported(f"pre-tokenizer {kind}")


def _normalizer(spec: dict[str, Any] | None) -> Callable[[str], str]:
    if spec is None:
        return lambda s: s
    kind = spec.get("type")
    if kind == "Sequence":
        steps = [_normalizer(s) for s in spec.get("normalizers", [])]

        def run(s: str) -> str:
            for step in steps:
                s = step(s)
            return s

        return run
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return lambda s: unicodedata.normalize(kind, s)
    if kind == "Lowercase":
        return str.lower
    if kind == "Replace":
        pat, content = _pattern(spec["pattern"]), spec.get("content", "")
        return lambda s: pat.sub(lambda _m: content, s)
    if kind == "Prepend":
        prepend = spec.get("prepend", "")
        return lambda s: prepend + s if s else s
    raise _Unsupported(f"normalizer {kind}")


class HfTokenizer:
    """Just enough of Hugging Face ``tokenizers`` to run a byte-level BPE tokenizer.json."""

    def __init__(self, tj: dict[str, Any], source: str) -> None:
        model = tj.get("model") or {}
        if model.get("type") != "BPE":
            raise UnsupportedModelError(
                f"{source}: tokenizer model type {model.get('type')!r} is not supported",
                "pipx-llama converts SentencePiece (tokenizer.model) and byte-level BPE tokenizers",
            )
        if model.get("byte_fallback"):
            raise UnsupportedModelError(
                f"{source} is a SentencePiece-style BPE tokenizer stored as JSON",
                "put the model's tokenizer.model next to it; it is converted from that file",
            )
        if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            raise UnsupportedModelError(f"{source}: BPE with subword prefixes/suffixes is not supported")
        self.source = source
        self.vocab: dict[str, int] = model.get("vocab") or {}
        merges = model.get("merges") or []
        pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
        self.ranks: dict[tuple[str, ...], int] = {}
        for rank, pair in enumerate(pairs):
            self.ranks.setdefault(pair, rank)
        self.ignore_merges = bool(model.get("ignore_merges"))
        unk = model.get("unk_token")
        self.unk_id = self.vocab.get(unk) if unk is not None else None
        self.added = {a["content"]: a["id"] for a in tj.get("added_tokens") or []}
        self.added_re = (
            regex.compile("|".join(regex.escape(t) for t in sorted(self.added, key=len, reverse=True)))
            if self.added else None
        )
        self.spec = tj

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` as ``tokenizer.encode(text)`` in ``transformers`` gives them."""
        try:
            normalize = _normalizer(self.spec.get("normalizer"))
            pre = _pre_tokenizer(self.spec.get("pre_tokenizer"))
        except _Unsupported as err:
            raise UnsupportedModelError(
                f"{self.source}: {err} is not supported, so the pre-tokenizer cannot be identified",
                "convert this model with llama.cpp's convert_hf_to_gguf.py",
            ) from err
        ids: list[int] = []
        for is_added, chunk in self._split_added(text):
            if is_added:
                ids.append(self.added[chunk])
                continue
            for word in pre([normalize(chunk)]):
                ids.extend(self._bpe(word))
        return self._post(ids) if add_special_tokens else ids

    def _split_added(self, text: str) -> list[tuple[bool, str]]:
        if self.added_re is None:
            return [(False, text)]
        out: list[tuple[bool, str]] = []
        pos = 0
        for m in self.added_re.finditer(text):
            if m.start() > pos:
                out.append((False, text[pos:m.start()]))
            out.append((True, m.group()))
            pos = m.end()
        if pos < len(text):
            out.append((False, text[pos:]))
        return out

    def _bpe(self, word: str) -> list[int]:
        if self.ignore_merges and word in self.vocab:
            return [self.vocab[word]]
        syms = list(word)
        ranks = self.ranks
        while len(syms) > 1:
            best, at = None, -1
            for i in range(len(syms) - 1):
                r = ranks.get((syms[i], syms[i + 1]))
                if r is not None and (best is None or r < best):
                    best, at = r, i
            if best is None:
                break
            syms[at:at + 2] = [syms[at] + syms[at + 1]]
        ids = []
        for s in syms:
            tid = self.vocab.get(s, self.unk_id)
            if tid is not None:
                ids.append(tid)
        return ids

    def _post(self, ids: list[int]) -> list[int]:
        post = self.spec.get("post_processor")
        procs = (post.get("processors", [post]) if post.get("type") == "Sequence" else [post]) if post else []
        for proc in procs:
            kind = proc.get("type")
            if kind == "TemplateProcessing":
                out: list[int] = []
                specials = proc.get("special_tokens", {})
                for item in proc.get("single", []):
                    if "SpecialToken" in item:
                        out.extend(specials[item["SpecialToken"]["id"]]["ids"])
                    else:
                        out.extend(ids)
                ids = out
            elif kind in ("RobertaProcessing", "BertProcessing"):
                ids = [proc["cls"][1], *ids, proc["sep"][1]]
        return ids


def detect_pre(tok: HfTokenizer) -> str:
    """``tokenizer.ggml.pre`` for a BPE tokenizer, by the hash of its ids for ``CHKTXT``."""
    chkhsh = sha256(str(tok.encode(CHKTXT)).encode()).hexdigest()
    pre = PRE_BY_HASH.get(chkhsh)
    if pre is None:
        raise UnsupportedModelError(
            f"{tok.source}: the BPE pre-tokenizer was not recognized (chkhsh {chkhsh})",
            "this tokenizer is not in llama.cpp's table of known pre-tokenizers that pipx-llama supports",
        )
    return pre
