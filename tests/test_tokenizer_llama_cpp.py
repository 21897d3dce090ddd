"""Differential tests: our tokenizer against llama.cpp itself (llama-cpp-python) on generated text.

For every vocab file llama.cpp ships that we implement, and for the real Gemma 3 and Qwen2.5-Coder
models, a few thousand seeded random strings -- runs of every Unicode whitespace kind, CJK, emoji
sequences, combining marks, digit runs in many scripts, contractions, special-token text, code
points llama.cpp's Unicode table does not know, long words -- are tokenized by both with every
combination of ``add_special`` / ``parse_special`` and must give the same ids. The vocabulary's
metadata-derived state (special ids, BOS/EOS flags, end-of-generation set, token attributes) and
the tokens' pieces are compared as well.
"""

from __future__ import annotations

import ctypes
import random
from pathlib import Path

import pytest
from conftest import VOCAB_NAMES, VOCAB_ONLY_NAMES

from pipx_llama.formats.gguf import open_gguf
from pipx_llama.tokenizer.spm import ATTR_CONTROL, ATTR_NORMAL, ATTR_UNKNOWN, ATTR_USER_DEFINED
from pipx_llama.tokenizer.tokenizer import Tokenizer

llama_cpp = pytest.importorskip("llama_cpp")

N_STRINGS = 2000

# Every White_Space code point (llama.cpp's unicode_set_whitespace), plus look-alikes that are not.
WHITESPACE = [chr(c) for c in (0x9, 0xA, 0xB, 0xC, 0xD, 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B))] + [
    "\u2028", "\u2029", "\u202f", "\u205f", "\u3000",
]  # fmt: skip
NOT_WHITESPACE = [
    "\x1c", "\x1f", "\u200b", "\u200c", "\u200d", "\ufeff", "\u180e", "\u2060", "\x00", "\x7f", "\x08",
]  # fmt: skip
WORDS = [
    "Hello", "world", "the", "THE", "Don", "it", "I", "McDonald", "iPhone", "naïve", "café", "Straße",
    "ΑΘΗΝΑ",
    "καλημέρα", "Привет", "мир", "שלום", "مرحبا", "नमस्ते", "हिन्दी", "สวัสดี", "ქართული", "Հայերեն", "tiếng",
    "Việt", "ǅemal", "ﬁle", "ＡＢＣ", "ａｂｃ", "µ", "ß", "Ω", "ℕ", "𝐀𝐁𝐂", "𝒳", "def", "return", "self",
]  # fmt: skip
CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'RE", "'Ve", "'LL", "’s", "'x", "''"]
NUMBERS = ["٠١٢٣", "۴۵۶", "०१२", "০১", "๑๒๓", "０１２３", "²³¹", "½¾", "①②⑩", "ⅠⅡⅫ", "〇", "𝟎𝟏𝟐"]
PUNCTUATION = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
                   "、。「」『』！？，：；（）《》…—–“”‘’«»¡¿·•§¶†‡※〜～・") + [
    "...", "?!", "``", "--", "->", "=>", "::", "<=", ">>>", "@@", "##", "$$", "{{", "}}", "*/", "/*",
]  # fmt: skip
CJK = [
    "你好", "世界", "中文字符", "漢字", "日本語", "こんにちは", "カタカナ", "ｶﾀｶﾅ", "한국어", "안녕하세요",
    "ㄱㄴ",
    "𠀀𠀁", "㐀", "々", "ー",
]  # fmt: skip
EMOJI = ["🦙", "😀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "❤️", "☺︎", "✨", "🚀", "🏳️‍🌈", "©", "™", "🀄", "1️⃣", "#️⃣"]
MARKS = [
    "\u0301", "\u0308", "\u0327", "\u20dd", "\u093e", "\u094d", "\u0e31", "\u05b7", "\u064b", "\ufe0f",
    "\U000e0100",
]  # fmt: skip
# Replacement char, private use, unassigned in llama.cpp's table (U+0378, U+13683), SPM's space mark,
# texts that look like byte or special tokens, soft hyphen, bidi controls.
ODD = [
    "\ufffd", "\ue000", "\U000f0000", "\u0378", "\U0001d400", "\U00013683", "\u2581", "\u2581\u2581",
    "<0x41>", "<unk>", "<s>", "</s>", "[INST]", "<|endoftext|>", "<|im_start|>", "<|im_", "\U0010fffd",
    "\u00ad",
    "\u200e",
]  # fmt: skip


def _whitespace_run(rng: random.Random) -> str:
    n = rng.choice([1, 1, 1, 2, 2, 3, 4, 8, 17])
    return "".join(rng.choice([*WHITESPACE, *" " * 6, *"\n" * 3, "\r\n"]) for _ in range(n))


def _long_run(rng: random.Random) -> str:
    unit = rng.choice(["a", "ab", "abracadabra", "9", " ", "\n", "ー", "=", "🦙", "\u2581"])
    return unit * rng.randint(20, 200)


def _segment(rng: random.Random, specials: list[str]) -> str:
    k = rng.random()
    if k < 0.17:
        return _whitespace_run(rng)
    if k < 0.33:
        return rng.choice(WORDS)
    if k < 0.38:
        return rng.choice(CONTRACTIONS)
    if k < 0.46:
        return "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 12)))
    if k < 0.50:
        return rng.choice(NUMBERS)
    if k < 0.58:
        return "".join(rng.choice(PUNCTUATION) for _ in range(rng.randint(1, 3)))
    if k < 0.65:
        return rng.choice(CJK)
    if k < 0.70:
        return rng.choice(EMOJI)
    if k < 0.75:
        return rng.choice(WORDS)[:3] + rng.choice(MARKS) * rng.randint(1, 2)
    if k < 0.79:
        return rng.choice(NOT_WHITESPACE)
    if k < 0.84:
        return rng.choice(ODD)
    if k < 0.91 and specials:
        return rng.choice(specials)
    if k < 0.92:
        return _long_run(rng)
    lo, hi = rng.choice(
        [(0x20, 0x7E), (0xA0, 0x2FFF), (0x3000, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF)]
    )
    return chr(rng.randint(lo, hi))


def generate_texts(seed: int, n: int, specials: list[str]) -> list[str]:
    """``n`` strings of 1-12 segments, half of them with a space after some segments."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        parts = [_segment(rng, specials) for _ in range(rng.randint(1, 12))]
        if rng.random() < 0.5:
            parts = [p + " " if rng.random() < 0.5 else p for p in parts]
        texts.append("".join(parts))
    return texts


def _special_texts(tok: Tokenizer, rng: random.Random) -> list[str]:
    ids = [
        i for i in range(tok.n_vocab) if tok.token_attr(i) & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN)
    ]
    return [tok.token_text(i) for i in rng.sample(ids, min(len(ids), 60))]


def _compare(path: Path, seed: int) -> None:
    tok = Tokenizer.from_gguf_metadata(open_gguf(path).metadata, path.name)
    ref = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    texts = generate_texts(seed, N_STRINGS, _special_texts(tok, random.Random(seed)))
    flags = [(True, True), (True, False), (False, True), (False, False)]
    mismatches = []
    for i, text in enumerate(texts):
        add_special, parse_special = flags[i % 4]
        ours = tok.encode(text, add_special, parse_special)
        theirs = ref.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)
        if ours != theirs:
            mismatches.append((text, add_special, parse_special, ours, theirs))
    assert not mismatches, f"{len(mismatches)}/{len(texts)} differ, first: {mismatches[:3]}"
    _compare_vocab_state(tok, ref)


def _compare_vocab_state(tok: Tokenizer, ref: object) -> None:
    vocab = llama_cpp.llama_model_get_vocab(ref.model)  # type: ignore[attr-defined]
    n = llama_cpp.llama_vocab_n_tokens(vocab)
    assert n == tok.n_vocab

    def opt(tid: int | None) -> int:
        return -1 if tid is None else tid

    assert (opt(tok.bos_id), opt(tok.eos_id), opt(tok.eot_id), tok.add_bos, tok.add_eos) == (
        llama_cpp.llama_vocab_bos(vocab),
        llama_cpp.llama_vocab_eos(vocab),
        llama_cpp.llama_vocab_eot(vocab),
        llama_cpp.llama_vocab_get_add_bos(vocab),
        llama_cpp.llama_vocab_get_add_eos(vocab),
    )
    assert tok.stop_ids == {t for t in range(n) if llama_cpp.llama_vocab_is_eog(vocab, t)}
    ours = [tok.token_attr(t) for t in range(n)]
    bad_attrs = [t for t in range(n) if ours[t] != llama_cpp.llama_vocab_get_attr(vocab, t)]
    assert not bad_attrs, [(t, tok.token_text(t)) for t in bad_attrs[:5]]
    # Pieces with special=True for every token that is not NORMAL and a sample of the rest;
    # special=False differs in llama_token_to_piece only for control and unknown tokens.
    rng = random.Random(n)
    odd = [t for t in range(n) if ours[t] != ATTR_NORMAL]
    hidden = [t for t in odd if ours[t] & (ATTR_CONTROL | ATTR_UNKNOWN)]
    buf = ctypes.create_string_buffer(4096)
    bad_pieces = []
    for special, ids in ((True, odd + rng.sample(range(n), min(n, 20_000))), (False, hidden)):
        for t in ids:
            size = llama_cpp.llama_token_to_piece(vocab, t, buf, len(buf), 0, special)
            theirs = buf.raw[:size]
            # A byte-level BPE token holding characters outside GPT-2's byte table (command-r has such
            # raw UTF-8 tokens) is "[UNK_BYTE_0x..]" text in llama.cpp; ours keeps the characters.
            if tok.token_to_piece(t, special) != theirs and not theirs.startswith(b"[UNK_BYTE_0x"):
                bad_pieces.append((t, special, theirs))
    assert not bad_pieces, bad_pieces[:5]


@pytest.mark.parametrize("name", VOCAB_NAMES + VOCAB_ONLY_NAMES)
def test_vocab_file_matches_llama_cpp(vocab_dir: Path, name: str) -> None:
    _compare(vocab_dir / name, seed=sum(map(ord, name)))


def test_gemma3_matches_llama_cpp(gemma3_270m_path: Path) -> None:
    _compare(gemma3_270m_path, seed=3)


def test_qwen25_coder_matches_llama_cpp(qwen25_coder_path: Path) -> None:
    _compare(qwen25_coder_path, seed=25)


def test_generated_texts_cover_what_they_claim() -> None:
    texts = generate_texts(1, N_STRINGS, ["<|special|>"])
    joined = "".join(texts)
    for group in (WHITESPACE, NOT_WHITESPACE, CJK, EMOJI, MARKS, NUMBERS, ODD, CONTRACTIONS, ["<|special|>"]):
        assert all(item in joined for item in group), group
    assert any(len(t) > 200 for t in texts)
    assert len(set(texts)) > 0.95 * len(texts)
