"""The model's tokenizer, built from GGUF metadata, giving llama.cpp's token ids for any text.

``Tokenizer.from_gguf_metadata`` reads ``tokenizer.ggml.*`` the way ``llama_vocab::impl::load`` does
(src/llama-vocab.cpp): per-model defaults for the special ids and the BOS/EOS flags, the metadata's
overrides, the text-based detection of end-of-turn / FIM / end-of-generation tokens (which also
forces them to control type), and the special-token cache. ``encode`` follows ``llama_vocab::impl::
tokenize``: special tokens written in the text are cut out first (longest first; control tokens only
with ``parse_special``), then each remaining fragment goes through the SPM or BPE model.

``token_to_piece`` and ``decode`` follow ``llama_token_to_piece`` / ``llama_detokenize``;
``StreamDecoder`` turns ids into text one at a time without ever splitting a UTF-8 character.
"""

from __future__ import annotations

import codecs
import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from pipx_llama.errors import ChatTemplateError, TokenizerError, UsageError
from pipx_llama.tokenizer.bpe import BpeModel, decode_bpe_text, pre_tokenizer
from pipx_llama.tokenizer.gotemplate import GoTemplate, parse_go_template
from pipx_llama.tokenizer.spm import (
    ATTR_BYTE,
    ATTR_CONTROL,
    ATTR_NORMAL,
    ATTR_UNKNOWN,
    ATTR_UNUSED,
    ATTR_USER_DEFINED,
    SpmModel,
)

ATTR_LSTRIP = 1 << 7
ATTR_RSTRIP = 1 << 8
_ATTR_SPECIAL = ATTR_UNKNOWN | ATTR_CONTROL

# GGUF tokenizer.ggml.token_type -> llama_token_attr (LLAMA_TOKEN_TYPE_* values 0..6).
_TYPE_TO_ATTR = np.array(
    [0, ATTR_NORMAL, ATTR_UNKNOWN, ATTR_CONTROL, ATTR_USER_DEFINED, ATTR_UNUSED, ATTR_BYTE]
)

# Texts llama.cpp recognises when the metadata does not name the token. Where a vocabulary has several,
# llama.cpp takes whichever its hash map yields first; here the first in this order (chat markers first).
_EOT_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
    "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>",
)  # fmt: skip
_EOM_TEXTS = ("<|eom_id|>",)
_FIM_PRE_TEXTS = (
    "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>", "<|code_prefix|>",
    "<|prefix|>",
)  # fmt: skip
_FIM_SUF_TEXTS = (
    "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>", "<|code_suffix|>",
    "<|suffix|>",
)  # fmt: skip
_FIM_MID_TEXTS = (
    "<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>", "<|code_middle|>",
    "<|middle|>",
)  # fmt: skip
_FIM_PAD_TEXTS = ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]")
_FIM_REP_TEXTS = ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>")
_FIM_SEP_TEXTS = ("<|file_sep|>",)
_EOG_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~[",
)  # fmt: skip
_ALWAYS_RENDERED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")

# Metadata key suffix -> special-id slot, in llama.cpp's order (the deprecated FIM keys come last).
_SPECIAL_KEYS = (
    ("bos_token_id", "bos"), ("eos_token_id", "eos"), ("eot_token_id", "eot"), ("eom_token_id", "eom"),
    ("unknown_token_id", "unk"), ("seperator_token_id", "sep"), ("padding_token_id", "pad"),
    ("mask_token_id", "mask"), ("fim_pre_token_id", "fim_pre"), ("fim_suf_token_id", "fim_suf"),
    ("fim_mid_token_id", "fim_mid"), ("fim_pad_token_id", "fim_pad"), ("fim_rep_token_id", "fim_rep"),
    ("fim_sep_token_id", "fim_sep"), ("prefix_token_id", "fim_pre"), ("suffix_token_id", "fim_suf"),
    ("middle_token_id", "fim_mid"),
)  # fmt: skip

_C_SPACE = " \t\n\v\f\r"  # C isspace() in the "C" locale, which llama.cpp's lstrip/rstrip use
_KEY = "tokenizer.ggml."


def _scalar(meta: Mapping[str, Any], key: str, kind: type, source: str) -> Any:
    value = meta.get(key)
    if value is None:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    ok = isinstance(value, bool) if kind is bool else isinstance(value, kind) and not isinstance(value, bool)
    if not ok:
        raise TokenizerError(
            f"{source}: metadata key {key} should be {kind.__name__}, found {type(value).__name__}",
            "the GGUF file's tokenizer metadata is malformed; re-download or re-convert the model",
        )
    return value


def _clean_spaces(buf: bytearray) -> bytes:
    """llama_detokenize's clean_up_tokenization_spaces passes, ported loop for loop (in place)."""
    n = len(buf)
    total = 1 if n else 0
    for i in range(1, n):
        x = buf[i]
        if buf[i - 1] == 0x20 and x in b"?!.,":
            total -= 1
        buf[total] = x
        total += 1
    n = total
    total = 1 if n else 0
    i = 1
    while i < n:
        x = buf[i]
        if x == 0x27 and i + 1 < n and buf[i - 1] == 0x20 and buf[i + 1] == 0x20:
            total -= 1
            i += 1
            buf[i] = 0
        buf[total] = x
        total += 1
        i += 1
    n = total
    total = 1 if n else 0
    for i in range(1, n):
        x = buf[i]
        if buf[i - 1] == 0x20 and x == 0x27 and i + 1 < n:
            x1 = buf[i + 1]
            # " 's", " 'm", " 're", " 've" lose the space; " 't", " 'd", " 'll" keep it.
            if x1 in b"sm" or (i + 2 < n and (x1, buf[i + 2]) in ((0x72, 0x65), (0x76, 0x65))):
                total -= 1
        buf[total] = x
        total += 1
    return bytes(buf[:total])


_Special = tuple[str, int, bool, bool]  # text, id, lstrip, rstrip


class _SpecialTexts:
    """Special tokens in partition order, indexed by their first two characters.

    Partitioning tries every special token in turn, but most cannot occur in a given text (Gemma has
    6,000 "<unusedN>"); the character pairs of the text pick the few that can, in the same order.
    """

    def __init__(self, entries: list[_Special]) -> None:
        self.entries = entries
        self._index: dict[str, list[int]] = {}
        for order, entry in enumerate(entries):
            self._index.setdefault(entry[0][:2], []).append(order)

    def candidates(self, text: str) -> list[_Special]:
        keys = set(text)
        keys.update(text[i : i + 2] for i in range(len(text) - 1))
        groups = [self._index[key] for key in keys & self._index.keys()]
        if sum(map(len, groups)) * 4 > len(self.entries):
            return self.entries  # most of them: cheaper to try all than to sort the subset
        return [self.entries[o] for o in sorted(itertools.chain.from_iterable(groups))]


class Tokenizer:
    """llama.cpp-exact tokenizer for an SPM (``llama``) or byte-level BPE (``gpt2``) vocabulary."""

    def __init__(self, meta: Mapping[str, Any], source: str = "") -> None:
        src = source or "model"
        self.source = src
        model = meta.get(_KEY + "model")
        if model is None:
            raise TokenizerError(
                f"{src}: no tokenizer in the metadata (tokenizer.ggml.model is missing)",
                "this file has no vocabulary; use a complete GGUF model",
            )
        if model not in ("llama", "gpt2"):
            raise TokenizerError(
                f"{src}: unsupported tokenizer model '{model}' (tokenizer.ggml.model)",
                "supported: 'llama' (SentencePiece) and 'gpt2' (byte-level BPE) vocabularies",
            )
        self.model = str(model)
        self.is_spm = model == "llama"
        pre_name = meta.get(_KEY + "pre")
        self.pre = str(pre_name) if pre_name else "default"

        tokens = meta.get(_KEY + "tokens")
        if isinstance(tokens, tuple):
            tokens = list(tokens)
        if not isinstance(tokens, list) or not tokens or not isinstance(tokens[0], str):
            raise TokenizerError(
                f"{src}: tokenizer.ggml.tokens is missing or not a list of strings",
                "the GGUF file's vocabulary is malformed; re-download or re-convert the model",
            )
        n = len(tokens)
        if not all(tokens):
            tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        self._tokens: list[str] = tokens
        self.n_vocab = n
        # llama.cpp's token_to_id: for duplicate texts the last id wins, which dict() also does.
        self._token_to_id: dict[str, int] = dict(zip(tokens, range(n)))

        scores = meta.get(_KEY + "scores")
        if scores is None:
            scores_arr = np.zeros(n, dtype=np.float32)
        else:
            scores_arr = np.asarray(scores, dtype=np.float32)
            if scores_arr.ndim != 1 or len(scores_arr) < n:
                raise TokenizerError(
                    f"{src}: tokenizer.ggml.scores has {scores_arr.size} entries for {n} tokens",
                    "the GGUF file's vocabulary is malformed; re-download or re-convert the model",
                )
        types = meta.get(_KEY + "token_type")
        if types is None:
            attrs = np.full(n, ATTR_NORMAL, dtype=np.int64)
        else:
            types_arr = np.asarray(types, dtype=np.int64)
            if types_arr.ndim != 1 or len(types_arr) < n:
                raise TokenizerError(
                    f"{src}: tokenizer.ggml.token_type has {types_arr.size} entries for {n} tokens",
                    "the GGUF file's vocabulary is malformed; re-download or re-convert the model",
                )
            types_arr = types_arr[:n]
            valid = (types_arr >= 0) & (types_arr < len(_TYPE_TO_ATTR))
            attrs = np.where(valid, _TYPE_TO_ATTR[np.clip(types_arr, 0, len(_TYPE_TO_ATTR) - 1)], 0)
        self._attrs = attrs.astype(np.int64)

        if self.is_spm:
            self.add_space_prefix = True
            self.clean_spaces = False
            add_bos, add_eos = True, False
            ids: dict[str, int | None] = {"bos": 1, "eos": 2, "unk": 0}
        else:
            pre = pre_tokenizer(self.pre, src)
            self.add_space_prefix = False
            self.clean_spaces = pre.clean_spaces
            add_bos, add_eos = pre.add_bos, False
            ids = {"bos": None if pre.no_bos else 11, "eos": 11}
        prefix = _scalar(meta, _KEY + "add_space_prefix", bool, src)
        if prefix is not None:
            self.add_space_prefix = prefix
        self._resolve_special_ids(meta, ids, src)
        value = _scalar(meta, _KEY + "add_bos_token", bool, src)
        self.add_bos = add_bos if value is None else value
        value = _scalar(meta, _KEY + "add_eos_token", bool, src)
        self.add_eos = add_eos if value is None else value
        self._detect_special_tokens(meta)

        self.chat_template: str | None = meta.get("tokenizer.chat_template") or None
        # an ollama template layer, for a GGUF without chat_template (use_ollama_template)
        self.ollama_template: GoTemplate | ChatTemplateError | None = None
        self._pieces: list[bytes | None] = [None] * n
        if self.is_spm:
            self._spm: SpmModel | None = SpmModel(tokens, scores_arr[:n], self._attrs, self._token_to_id, src)
            self._bpe: BpeModel | None = None
        else:
            merges = meta.get(_KEY + "merges")
            if not isinstance(merges, list):
                raise TokenizerError(
                    f"{src}: a BPE vocabulary without merges (tokenizer.ggml.merges is missing)",
                    "the GGUF file's vocabulary is incomplete; re-download or re-convert the model",
                )
            self._spm = None
            self._bpe = BpeModel(self._token_to_id, merges, self.pre, src)

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], source: str = "") -> Tokenizer:
        """Build the tokenizer from a GGUF metadata dict; ``source`` names the file in errors."""
        return cls(meta, source)

    # -- construction helpers -------------------------------------------------------------------

    def _resolve_special_ids(
        self, meta: Mapping[str, Any], defaults: dict[str, int | None], src: str
    ) -> None:
        n = self.n_vocab
        slots: dict[str, int | None] = {slot: None for _, slot in _SPECIAL_KEYS}
        for slot, value in defaults.items():
            slots[slot] = value if value is not None and 0 <= value < n else None
        for suffix, slot in _SPECIAL_KEYS:
            value = _scalar(meta, _KEY + suffix, int, src)
            if value is not None and 0 <= value < n:
                slots[slot] = value
        self._ids = slots

    def _find(self, texts: Iterable[str]) -> int | None:
        for text in texts:
            tid = self._token_to_id.get(text)
            if tid is not None:
                return tid
        return None

    def _detect_special_tokens(self, meta: Mapping[str, Any]) -> None:
        ids, attrs = self._ids, self._attrs
        for slot, texts in (
            ("eot", _EOT_TEXTS), ("eom", _EOM_TEXTS), ("fim_pre", _FIM_PRE_TEXTS),
            ("fim_suf", _FIM_SUF_TEXTS),
            ("fim_mid", _FIM_MID_TEXTS), ("fim_pad", _FIM_PAD_TEXTS), ("fim_rep", _FIM_REP_TEXTS),
            ("fim_sep", _FIM_SEP_TEXTS),
        ):  # fmt: skip
            if ids[slot] is None:
                tid = self._find(texts)
                if tid is not None:
                    ids[slot] = tid
                    attrs[tid] |= ATTR_CONTROL
        # Control tokens such as Gemma's "<unused0>" are marked unused, as llama.cpp's load() does (it walks
        # its text -> id map, so of duplicate texts only the id that map keeps).
        for tid in np.flatnonzero(attrs & ATTR_CONTROL).tolist():
            text = self._tokens[tid]
            if "unused" in text and self._token_to_id[text] == tid:
                attrs[tid] |= ATTR_UNUSED
        eog = {ids[s] for s in ("fim_pad", "fim_rep", "fim_sep") if ids[s] is not None}
        for text in _EOG_TEXTS:
            tid = self._token_to_id.get(text)
            if tid is not None:
                eog.add(tid)
                attrs[tid] |= ATTR_CONTROL
        for text in _ALWAYS_RENDERED:
            tid = self._token_to_id.get(text)
            if tid is not None:
                attrs[tid] = ATTR_USER_DEFINED
        eog.update(ids[s] for s in ("eos", "eot", "eom") if ids[s] is not None)
        # gpt-oss / solar-open: "<|end|>" ends a message there, not the generation.
        eog_texts = {self._tokens[t]: t for t in eog}
        if "<|end|>" in eog_texts and (
            {"<|return|>", "<|call|>"} <= eog_texts.keys() or {"<|calls|>", "<|flush|>"} <= eog_texts.keys()
        ):
            end = eog_texts["<|end|>"]
            eog.discard(end)
            attrs[end] = ATTR_USER_DEFINED
        # gemma4 / plamo2 have an ordinary "</s>".
        if "</s>" in eog_texts and ("<|tool_response>" in eog_texts or "<|plamo:eos|>" in eog_texts):
            s_id = eog_texts["</s>"]
            eog.discard(s_id)
            attrs[s_id] = ATTR_NORMAL
        self.stop_ids: frozenset[int] = frozenset(eog)

        special = np.flatnonzero(attrs & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN)).tolist()
        name = str(meta.get("general.name") or "").lower()
        if "phi-3" in name or "phi3" in name:
            for tid in special:
                attrs[tid] |= ATTR_RSTRIP
            for text, on in (("</s>", True), ("<unk>", False), ("<s>", False), ("<|endoftext|>", False)):
                tid = self._token_to_id.get(text)
                if tid is not None:
                    attrs[tid] = attrs[tid] | ATTR_RSTRIP if on else attrs[tid] & ~ATTR_RSTRIP
        # Longest first, as llama.cpp's cache_special_tokens (by UTF-8 length; ties by id here).
        special.sort(key=lambda t: (-len(self._tokens[t].encode("utf-8", "surrogateescape")), t))
        entries = [
            (self._tokens[t], t, bool(attrs[t] & ATTR_LSTRIP), bool(attrs[t] & ATTR_RSTRIP)) for t in special
        ]
        self._special_all = _SpecialTexts(entries)
        self._special_user = _SpecialTexts([e for e in entries if not attrs[e[1]] & _ATTR_SPECIAL])

    # -- public properties --------------------------------------------------------------------

    @property
    def bos_id(self) -> int | None:
        return self._ids["bos"]

    @property
    def eos_id(self) -> int | None:
        return self._ids["eos"]

    @property
    def eot_id(self) -> int | None:
        return self._ids["eot"]

    @property
    def eom_id(self) -> int | None:
        return self._ids["eom"]

    @property
    def unk_id(self) -> int | None:
        return self._ids["unk"]

    @property
    def pad_id(self) -> int | None:
        return self._ids["pad"]

    @property
    def bos_token(self) -> str:
        """BOS as text ("" when the vocabulary has none), for chat templates."""
        return self._tokens[self.bos_id] if self.bos_id is not None else ""

    @property
    def eos_token(self) -> str:
        return self._tokens[self.eos_id] if self.eos_id is not None else ""

    @property
    def uses_sentencepiece(self) -> bool:
        """True when SPM text goes through the sentencepiece library (else the Python port of llama.cpp)."""
        return self._spm is not None and self._spm.processor is not None

    def is_eog(self, token_id: int) -> bool:
        """Whether llama.cpp ends generation on this token (EOS, EOT, EOM, and their look-alikes)."""
        return token_id in self.stop_ids

    def is_control(self, token_id: int) -> bool:
        return bool(self._attrs[self._check_id(token_id)] & ATTR_CONTROL)

    def token_attr(self, token_id: int) -> int:
        """llama.cpp's ``llama_token_attr`` bit set for the token."""
        return int(self._attrs[self._check_id(token_id)])

    def token_text(self, token_id: int) -> str:
        """The token's raw vocabulary string (e.g. ``"▁Hello"``, ``"Ġworld"``, ``"<|im_end|>"``)."""
        return self._tokens[self._check_id(token_id)]

    def token_id(self, text: str) -> int | None:
        """The id whose raw vocabulary string is ``text``, or None."""
        return self._token_to_id.get(text)

    # -- encoding ----------------------------------------------------------------------------------

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """llama.cpp's ``llama_tokenize(text, add_special, parse_special)``."""
        if not isinstance(text, str):
            raise UsageError(f"encode() needs a str, got {type(text).__name__}", "pass the prompt as text")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            # Lone surrogates cannot be UTF-8; llama.cpp turns each invalid byte into U+FFFD.
            text = "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in text)
        out: list[int] = []
        if add_special and self.add_bos:
            out.append(self._required("bos"))
        fragments = self._partition(text, parse_special) if text else []
        if self._spm is not None:
            prev_special = True
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                    prev_special = True
                else:
                    if self.add_space_prefix and prev_special:
                        frag = " " + frag
                    self._spm.encode_fragment(frag, out)
                    prev_special = False
        elif self._bpe is not None:
            bpe = self._bpe
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                else:
                    bpe.encode_fragment(frag, out)
        if add_special and self.add_eos:
            out.append(self._required("eos"))
        return out

    def _required(self, slot: str) -> int:
        tid = self._ids[slot]
        if tid is None:
            raise TokenizerError(
                f"{self.source}: the tokenizer adds a {slot.upper()} token but the vocabulary has none",
                "encode with add_special=False, or fix tokenizer.ggml.add_bos_token/add_eos_token",
            )
        return tid

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """``tokenizer_st_partition``: cut special tokens out of the text, longest first."""
        frags: list[str | int] = [text]
        specials = self._special_all if parse_special else self._special_user
        for tok_text, tid, lstrip, rstrip in specials.candidates(text):
            if tok_text not in text:
                continue
            new: list[str | int] = []
            for frag in frags:
                if isinstance(frag, int) or tok_text not in frag:
                    new.append(frag)
                    continue
                pos = 0
                size = len(tok_text)
                while True:
                    match = frag.find(tok_text, pos)
                    if match < 0:
                        break
                    left = frag[pos:match]
                    if lstrip:
                        left = left.rstrip(_C_SPACE)
                    if left:
                        new.append(left)
                    new.append(tid)
                    pos = match + size
                    if rstrip:
                        while pos < len(frag) and frag[pos] in _C_SPACE:
                            pos += 1
                if pos < len(frag):
                    new.append(frag[pos:])
            frags = new
        return frags

    # -- decoding ------------------------------------------------------------------------------------

    def _check_id(self, token_id: int) -> int:
        if not isinstance(token_id, (int, np.integer)) or isinstance(token_id, bool):
            raise UsageError(
                f"token ids must be integers, got {type(token_id).__name__}", "pass a list of int ids"
            )
        if not 0 <= token_id < self.n_vocab:
            raise TokenizerError(
                f"token id {token_id} is out of range for this vocabulary ({self.n_vocab} tokens)",
                "the ids do not come from this model's tokenizer",
            )
        return int(token_id)

    def token_to_piece(self, token_id: int, special: bool = False) -> bytes:
        """``llama_token_to_piece``: the token's bytes; control/unknown tokens are empty unless
        ``special``."""
        tid = self._check_id(token_id)
        attr = self._attrs[tid]
        if not special and attr & _ATTR_SPECIAL:
            return b""
        piece = self._pieces[tid]
        if piece is None:
            piece = self._make_piece(tid, int(attr))
            self._pieces[tid] = piece
        return piece

    def _make_piece(self, tid: int, attr: int) -> bytes:
        text = self._tokens[tid]
        if attr & (_ATTR_SPECIAL | ATTR_USER_DEFINED):
            return text.encode("utf-8", "surrogateescape")
        if attr & ATTR_NORMAL:
            if self.is_spm:
                return text.replace("\u2581", " ").encode("utf-8", "surrogateescape")
            return decode_bpe_text(text)
        if attr & ATTR_BYTE:
            try:
                return bytes([int(text[3:5], 16)])
            except ValueError:
                return b""
        return b""

    def decode_bytes(
        self, ids: Sequence[int], special: bool = False, clean_spaces: bool | None = None
    ) -> bytes:
        """The raw bytes ``decode`` turns into text (no UTF-8 repair)."""
        ids = list(ids)
        parts = [self.token_to_piece(t, special) for t in ids]
        # The space the SPM tokenizer put in front of the text is dropped: from the first piece, as
        # llama_detokenize does; after a leading BOS from the whole text, as llama-cpp-python's
        # detokenize does (llama.cpp would keep it there), so decode(encode(x)) == x either way.
        data = b"".join(parts)
        if self.add_space_prefix and ids:
            first = data if ids[0] == self.bos_id else parts[0]
            if first.startswith(b" "):
                data = data[1:]
        clean = self.clean_spaces if clean_spaces is None else clean_spaces
        if clean and any(p in data for p in (b" ?", b" !", b" .", b" ,", b" '")):
            data = _clean_spaces(bytearray(data))
        return data

    def decode(self, ids: Sequence[int], special: bool = False, clean_spaces: bool | None = None) -> str:
        """``llama_detokenize``; invalid UTF-8 (a character cut by the id list) becomes U+FFFD.

        ``clean_spaces`` defaults to the model's setting (llama.cpp's clean_up_tokenization_spaces,
        on for most BPE vocabularies: it removes the space in " ," " ." " 's" and the like).
        """
        return self.decode_bytes(ids, special, clean_spaces).decode("utf-8", "replace")

    def stream_decoder(self, special: bool = False) -> StreamDecoder:
        return StreamDecoder(self, special=special)

    def chat_prompt(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None) -> str:
        """The conversation as prompt text for ``encode(text)`` (default flags), as llama.cpp builds it.

        The model's chat template (or the built-in fallback) is rendered with this vocabulary's BOS/EOS
        texts; when the tokenizer adds BOS itself, a BOS the template wrote at the very start is
        removed (llama.cpp's common_chat_templates_apply does the same), so the ids hold one BOS.
        ``tools`` (OpenAI's function tools) are handed to the template; None leaves ``tools`` undefined.
        """
        from pipx_llama.tokenizer.chat import render_chat

        if self.chat_template is None and self.ollama_template is not None:
            if isinstance(self.ollama_template, ChatTemplateError):
                raise self.ollama_template
            if tools:
                raise ChatTemplateError("tools need the GGUF's own chat template; this model has only an "
                                        "ollama template", "send the request without tools")
            text = self.ollama_template.render(messages)
        else:
            text = render_chat(
                self.chat_template,
                messages,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                add_generation_prompt=add_generation_prompt,
                vocab=self._token_to_id,
                tools=tools,
            )
        if self.add_bos and self.bos_token and text.startswith(self.bos_token):
            text = text[len(self.bos_token) :]
        return text

    def use_ollama_template(self, source: str | None) -> bool:
        """Render chats with ollama's template ``source`` (Go text/template, the subset of
        :mod:`pipx_llama.tokenizer.gotemplate`) when the GGUF carries no ``tokenizer.chat_template``;
        the GGUF's own template wins. A template outside the subset is kept as its error, raised when a
        chat is rendered (a raw completion needs no template). True when the template is used."""
        if self.chat_template is not None or not source:
            return False
        try:
            self.ollama_template = parse_go_template(source)
        except ChatTemplateError as err:
            self.ollama_template = err
        return True

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.source!r}, model={self.model!r}, pre={self.pre!r}, n_vocab={self.n_vocab}, "
            f"bos={self.bos_id}, eos={self.eos_id}, add_bos={self.add_bos})"
        )


class StreamDecoder:
    """Feeds ids one at a time and returns the text they complete; never a broken UTF-8 character.

    Bytes of a character split across tokens are held back until the character is complete;
    ``flush`` returns whatever is left (an incomplete tail becomes U+FFFD). Pieces are
    ``token_to_piece`` as llama.cpp's streaming output uses them (no space stripping or clean-up).
    """

    def __init__(self, tokenizer: Tokenizer, special: bool = False) -> None:
        self._tokenizer = tokenizer
        self._special = special
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        return self._decoder.decode(self._tokenizer.token_to_piece(token_id, self._special))

    def feed_many(self, ids: Iterable[int]) -> str:
        return "".join(self.feed(t) for t in ids)

    def flush(self) -> str:
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text

    @property
    def pending(self) -> bool:
        """Whether bytes of an incomplete character are being held back."""
        return bool(self._decoder.getstate()[0])
