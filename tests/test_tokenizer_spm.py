"""SPM vocabularies: the sentencepiece path against the Python port of llama.cpp's algorithm."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from pipx_llama.formats.gguf import open_gguf
from pipx_llama.tokenizer import spm
from pipx_llama.tokenizer.tokenizer import Tokenizer

TRICKY = [
    "Hello world",
    "  two leading spaces",
    "trailing   ",
    "tabs\tand\nnewlines\r\n",
    "▁already▁escaped ▁ mixed",
    "<s> not special here </s>",
    "<0x41> looks like a byte token",
    "emoji 🦙🚀👨‍👩‍👧 CJK 日本語 Hangul 한국어 Thai ภาษาไทย",
    "\x00\x01\x7f control characters",
    "x\u0301 combining and \u200b zero width",
    "1234567890 3.14 -0",
]


@pytest.fixture(scope="module")
def spm_tok(vocab_dir: Path) -> Tokenizer:
    path = vocab_dir / "ggml-vocab-llama-spm.gguf"
    return Tokenizer.from_gguf_metadata(open_gguf(path).metadata, path.name)


def test_sentencepiece_is_used_for_llama_vocab(spm_tok: Tokenizer) -> None:
    assert spm_tok.uses_sentencepiece


def test_sentencepiece_matches_llama_cpp_port(spm_tok: Tokenizer) -> None:
    model = spm_tok._spm
    rng = random.Random(3)
    texts = list(TRICKY)
    for _ in range(200):
        texts.append(
            "".join(rng.choice(TRICKY[rng.randrange(len(TRICKY))]) for _ in range(rng.randint(1, 30)))
        )
    for text in texts:
        for prefix in ("", " "):
            fast: list[int] = []
            ref: list[int] = []
            model.encode_fragment(prefix + text, fast)
            model.encode_reference(prefix + text, ref)
            assert fast == ref, text


def _tiny_spm_meta(tokens: list[tuple[str, float, int]], **extra: object) -> dict:
    byte_tokens = [(f"<0x{b:02X}>", 0.0, 6) for b in range(256)]
    base = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)]
    vocab = base + byte_tokens + tokens
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [t for t, _, _ in vocab],
        "tokenizer.ggml.scores": np.array([s for _, s, _ in vocab], dtype=np.float32),
        "tokenizer.ggml.token_type": np.array([k for _, _, k in vocab], dtype=np.int32),
    }
    meta.update(extra)
    return meta


WORDS = [("▁", -1.0, 1), ("a", -2.0, 1), ("b", -2.0, 1), ("ab", -3.0, 1), ("▁a", -1.5, 1), ("▁ab", -2.5, 1)]


def test_tiny_vocab_both_paths() -> None:
    tok = Tokenizer.from_gguf_metadata(_tiny_spm_meta(WORDS), "tiny.gguf")
    assert tok.uses_sentencepiece
    base = 3 + 256
    ab, a_, ab_ = base + 3, base + 4, base + 5
    assert tok.encode("ab") == [1, ab_]
    assert tok.encode("ab ab", add_special=False) == [ab_, ab_]
    # "c" is not in the vocabulary: byte fallback.
    assert tok.encode("ac", add_special=False) == [a_, 3 + 0x63]
    assert tok.encode("ab</s>ab") == [1, ab_, 2, ab_]  # after a special token: space prefix again
    assert tok.encode("ab</s>ab", parse_special=False)[:2] == [1, ab_]
    # add_space_prefix false (as some GGUFs say) removes llama.cpp's leading space.
    no_prefix = Tokenizer.from_gguf_metadata(
        _tiny_spm_meta(WORDS, **{"tokenizer.ggml.add_space_prefix": False}), "tiny.gguf"
    )
    assert no_prefix.encode("ab", add_special=False) == [ab]
    assert no_prefix.decode([ab]) == "ab"


def test_duplicate_pieces_fall_back_to_the_port() -> None:
    # Duplicate texts make SentencePiece refuse the proto; llama.cpp keeps the last id for a text.
    tok = Tokenizer.from_gguf_metadata(_tiny_spm_meta([*WORDS, ("▁ab", -9.0, 1)]), "dup.gguf")
    assert not tok.uses_sentencepiece
    last = 3 + 256 + len(WORDS)
    assert tok.encode("ab", add_special=False) == [last]
    assert tok.decode(tok.encode("ab ba")) == "ab ba"


def test_reachable_byte_token_falls_back_to_the_port() -> None:
    # "<0x41>" can be built by merges here, which llama.cpp would do and SentencePiece would not.
    pieces = [("<", -1.0, 1), ("0", -1.0, 1), ("x", -1.0, 1), ("4", -1.0, 1), ("1", -1.0, 1), (">", -1.0, 1)]
    pieces += [("<0", -1.0, 1), ("<0x", -1.0, 1), ("<0x4", -1.0, 1), ("<0x41", -1.0, 1)]
    tok = Tokenizer.from_gguf_metadata(_tiny_spm_meta(pieces), "reach.gguf")
    assert not tok.uses_sentencepiece
    byte_a = 3 + 0x41
    assert tok.encode("<0x41>", add_special=False, parse_special=False)[-1] == byte_a


def test_reachable_by_merges() -> None:
    vocab = {"ab": 0, "abc": 1, "xy": 2}
    memo: dict[str, bool] = {}
    assert spm._reachable_by_merges("abc", vocab, memo)
    assert spm._reachable_by_merges("xyz", vocab, memo)  # "xy" + "z"
    assert not spm._reachable_by_merges("xzy", vocab, memo)
    assert spm._reachable_by_merges("q", vocab, memo)


def test_model_proto_wire_format() -> None:
    proto = spm.build_model_proto(["<unk>", "a"], np.array([0.0, -1.5], dtype=np.float32), [2, 1], 0, False)
    # pieces(1) { piece(1) "<unk>" score(2) 0.0 type(3) UNKNOWN } ...
    assert proto.startswith(b"\x0a\x0e\x0a\x05<unk>\x15\x00\x00\x00\x00\x18\x02")
    assert spm._varint(300) == b"\xac\x02" and spm._varint(-1) == b"\xff" * 9 + b"\x01"


def test_extra_unknown_tokens_and_phi3_rstrip() -> None:
    # Phi-3 types its placeholder tokens "unknown"; only one can be SentencePiece's unk piece.
    extra = [("<|placeholder1|>", 0.0, 2), ("<|placeholder2|>", 0.0, 2), ("<|end|>", 0.0, 3)]
    meta = _tiny_spm_meta(WORDS + extra, **{"general.name": "Phi-3 mini"})
    tok = Tokenizer.from_gguf_metadata(meta, "phi3.gguf")
    assert tok.uses_sentencepiece
    base = 3 + 256
    ab_, end = base + 5, base + len(WORDS) + 2
    # llama.cpp marks Phi-3's special tokens RSTRIP: the whitespace after "<|end|>" is dropped.
    assert tok.encode("ab<|end|>  \n ab") == [1, ab_, end, ab_]
    assert tok.stop_ids == {2, end}  # "<|end|>" ends generation
    reference: list[int] = []
    tok._spm.encode_reference(" <|placeholder1|>ab", reference)
    assert tok.encode("<|placeholder1|>ab", parse_special=False) == [1, *reference]
    assert tok.encode("<|placeholder1|>ab") == [1, base + len(WORDS), ab_]
