"""SentencePiece-style vocabularies (``tokenizer.ggml.model == "llama"``), as llama.cpp's
``llm_tokenizer_spm``.

llama.cpp tokenizes a fragment by splitting it into UTF-8 characters and repeatedly merging the
adjacent pair whose concatenation is a vocab token with the highest score (the leftmost on a tie);
leftover characters that are not tokens become byte tokens ``<0xXX>``. That is SentencePiece's BPE
encoder, so the fragment goes through the ``sentencepiece`` library, loaded from a ModelProto built
from the GGUF tokens, scores and types: BPE model, byte fallback, normalizer ``identity`` (no NFKC),
no dummy prefix (the caller adds llama.cpp's leading space itself), extra whitespace kept, spaces
escaped to U+2581.

The proto is written as protobuf wire bytes here: sentencepiece's generated ``sentencepiece_model_pb2``
refuses the protobuf runtime this project pins. Token types are mapped so SentencePiece merges
exactly the pieces llama.cpp can merge: llama.cpp looks merged text up among *all* tokens, so
control, user-defined and unused tokens become NORMAL pieces; only byte and unknown tokens keep their
type. If that mapping cannot be exact for a vocabulary (duplicate or rejected pieces, or a byte /
unknown token reachable by merges) the pure-Python port of llama.cpp's algorithm below is used.
"""

from __future__ import annotations

import heapq
import struct

import numpy as np
import sentencepiece

from pipx_llama.errors import TokenizerError

# llama.cpp's llama_token_attr bits.
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5

# sentencepiece.ModelProto.SentencePiece.Type
_SP_NORMAL = 1
_SP_UNKNOWN = 2
_SP_BYTE = 6


_SMALL_VARINTS = [bytes([v]) for v in range(0x80)]


def _varint(value: int) -> bytes:
    if 0 <= value < 0x80:
        return _SMALL_VARINTS[value]
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _field_varint(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint((number << 3) | 2) + _varint(len(payload)) + payload


def build_model_proto(
    tokens: list[str], scores: np.ndarray, sp_types: list[int], unk_id: int, byte_fallback: bool
) -> bytes:
    """Serialized ``sentencepiece.ModelProto`` (field numbers from sentencepiece_model.proto)."""
    parts = []
    pack_score = struct.Struct("<f").pack
    bytes_tag = _varint((1 << 3) | 2)  # field 1 (ModelProto.pieces, SentencePiece.piece), length-delimited
    score_tag = _varint((2 << 3) | 5)
    varint = _varint
    # Written inline (not through _field_bytes): a 262k-piece vocabulary is built on every model load.
    for text, score, sp_type in zip(tokens, scores.tolist(), sp_types):
        raw = text.encode("utf-8", "surrogateescape")
        piece = bytes_tag + varint(len(raw)) + raw + score_tag + pack_score(score)
        if sp_type != _SP_NORMAL:
            piece += _field_varint(3, sp_type)
        parts.append(bytes_tag + varint(len(piece)) + piece)
    trainer = (
        _field_varint(3, 2)  # model_type = BPE
        + _field_varint(4, len(tokens))  # vocab_size
        + _field_varint(35, int(byte_fallback))
        + _field_varint(40, unk_id)
        + _field_bytes(45, tokens[unk_id].encode("utf-8", "surrogateescape"))  # unk_piece
    )
    normalizer = (
        _field_bytes(1, b"identity")
        + _field_varint(3, 0)  # add_dummy_prefix
        + _field_varint(4, 0)  # remove_extra_whitespaces
        + _field_varint(5, 1)  # escape_whitespaces
    )
    parts.append(_field_bytes(2, trainer))
    parts.append(_field_bytes(3, normalizer))
    return b"".join(parts)


def _reachable_by_merges(text: str, token_to_id: dict[str, int], memo: dict[str, bool]) -> bool:
    """Whether llama.cpp's pairwise merges can build ``text`` (every intermediate must be a token)."""
    if len(text) == 1:
        return True
    known = memo.get(text)
    if known is not None:
        return known
    memo[text] = False
    result = False
    for k in range(1, len(text)):
        left, right = text[:k], text[k:]
        if (
            (len(left) == 1 or left in token_to_id)
            and (len(right) == 1 or right in token_to_id)
            and _reachable_by_merges(left, token_to_id, memo)
            and _reachable_by_merges(right, token_to_id, memo)
        ):
            result = True
            break
    memo[text] = result
    return result


class SpmModel:
    """Tokenizes escaped-or-not fragments the way llama.cpp's SPM session does."""

    def __init__(
        self,
        tokens: list[str],
        scores: np.ndarray,
        attrs: np.ndarray,
        token_to_id: dict[str, int],
        source: str,
    ) -> None:
        self._tokens = tokens
        self._scores = scores.astype(np.float64).tolist()
        self._token_to_id = token_to_id
        self._source = source
        self._byte_ids: list[int | None] = [None] * 256
        for b in range(256):
            tid = token_to_id.get(f"<0x{b:02X}>")
            if tid is None:
                # llama.cpp's fallback: the byte itself as a one-byte token text.
                tid = token_to_id.get(bytes([b]).decode("utf-8", "surrogateescape"))
            self._byte_ids[b] = tid
        self.processor = self._load_sentencepiece(tokens, scores, attrs, token_to_id)

    def _load_sentencepiece(
        self, tokens: list[str], scores: np.ndarray, attrs: np.ndarray, token_to_id: dict[str, int]
    ) -> sentencepiece.SentencePieceProcessor | None:
        if len(token_to_id) != len(tokens):
            return None  # duplicate texts: SentencePiece refuses them, llama.cpp keeps the last id
        sp_types = [_SP_NORMAL] * len(tokens)
        memo: dict[str, bool] = {}
        # SentencePiece never merges into byte / unknown pieces; llama.cpp would if merges could build them.
        byte_ids = np.flatnonzero(attrs & ATTR_BYTE).tolist()
        # Without all 256 byte pieces SentencePiece would emit <unk> where llama.cpp looks for the byte.
        if len(byte_ids) != 256:
            return None
        for tid in byte_ids:
            text = tokens[tid]
            if not (len(text) == 6 and text.startswith("<0x") and text.endswith(">")):
                return None
            if _reachable_by_merges(text, token_to_id, memo):
                return None
            sp_types[tid] = _SP_BYTE
        # SentencePiece needs exactly one unknown piece; with full byte fallback it never emits it, so
        # any token merges cannot build serves. Further "unknown" tokens stay NORMAL (llama.cpp merges
        # every token alike).
        candidates = (
            np.flatnonzero(attrs & ATTR_UNKNOWN).tolist() + np.flatnonzero(attrs & ATTR_CONTROL).tolist()
        )
        unk_id = next(
            (
                t
                for t in candidates
                if len(tokens[t]) > 1 and not _reachable_by_merges(tokens[t], token_to_id, memo)
            ),
            -1,
        )
        if unk_id < 0:
            return None
        sp_types[unk_id] = _SP_UNKNOWN
        proto = build_model_proto(tokens, scores, sp_types, unk_id, byte_fallback=True)
        processor = sentencepiece.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError, ValueError):
            # ValueError covers UnicodeDecodeError from a damaged byte piece such as '<0x3\xc7>';
            # the reference implementation below then tokenizes what sentencepiece would not load
            return None
        return processor

    def encode_fragment(self, text: str, out: list[int]) -> None:
        """Tokenize one raw fragment (spaces not yet escaped) and append the ids."""
        if self.processor is not None:
            out.extend(self.processor.EncodeAsIds(text))
        else:
            self.encode_reference(text, out)

    def encode_reference(self, text: str, out: list[int]) -> None:
        """llama.cpp's ``llm_tokenizer_spm_session::tokenize`` in Python (after whitespace escaping)."""
        text = text.replace(" ", "\u2581")
        n = len(text)
        if n == 0:
            return
        token_to_id = self._token_to_id
        scores = self._scores
        sym = list(text)
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        # Max-heap on score, then the smaller left index: (-score, left, right, merged length).
        heap: list[tuple[float, int, int, int]] = []

        def try_add(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            tid = token_to_id.get(sym[left] + sym[right])
            if tid is None:
                return
            heapq.heappush(heap, (-scores[tid], left, right, len(sym[left]) + len(sym[right])))

        for i in range(1, n):
            try_add(i - 1, i)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            if not sym[left] or not sym[right] or len(sym[left]) + len(sym[right]) != size:
                continue
            sym[left] += sym[right]
            sym[right] = ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            try_add(prev[left], left)
            try_add(left, nxt[left])
        i = 0
        while i >= 0:
            piece = sym[i]
            tid = token_to_id.get(piece)
            if tid is not None:
                out.append(tid)
            else:
                # Only single characters can be left without a token (every merge made one).
                for b in piece.encode("utf-8"):
                    byte_id = self._byte_ids[b]
                    if byte_id is None:
                        raise TokenizerError(
                            f"{self._source}: the vocabulary has no byte token <0x{b:02X}> for a character "
                            f"it cannot spell ({piece!r})",
                            "the model's tokenizer is incomplete; use text the vocabulary covers",
                        )
                    out.append(byte_id)
            i = nxt[i]
