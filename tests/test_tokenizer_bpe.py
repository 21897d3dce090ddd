"""Byte-level BPE internals: byte table, pre-tokenizer regexes, merge order, llama.cpp's Unicode classes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import regex

from pipx_llama.errors import TokenizerError
from pipx_llama.formats.gguf import open_gguf
from pipx_llama.tokenizer import bpe
from pipx_llama.tokenizer.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def smol(smollm2_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(open_gguf(smollm2_path).metadata, smollm2_path.name)


@pytest.fixture(scope="module")
def llama3(vocab_dir: Path) -> Tokenizer:
    path = vocab_dir / "ggml-vocab-llama-bpe.gguf"
    return Tokenizer.from_gguf_metadata(open_gguf(path).metadata, path.name)


def test_byte_table_is_gpt2s() -> None:
    assert len(set(bpe.BYTE_ENCODER)) == 256
    assert bpe.BYTE_ENCODER[ord("A")] == "A" and bpe.BYTE_ENCODER[ord("!")] == "!"
    assert bpe.BYTE_ENCODER[0x20] == "Ġ" and bpe.BYTE_ENCODER[0x0A] == "Ċ" and bpe.BYTE_ENCODER[0x00] == "Ā"
    assert bpe.decode_bpe_text("ĠHelloĊ") == b" Hello\n"
    assert bpe.decode_bpe_text("é") == b"\xe9"  # U+00E9 is the byte 0xE9 itself


def test_every_pre_tokenizer_compiles() -> None:
    for name, pre in bpe.PRE_TOKENIZERS.items():
        assert pre.regexes in bpe._REGEXES, name
    for patterns in bpe._REGEXES.values():
        for pattern in patterns:
            regex.compile(bpe.with_llama_categories(pattern))


def test_category_classes_follow_llama_cpp_table() -> None:
    letters = regex.compile(bpe.with_llama_categories(r"\p{L}+"))
    assert letters.fullmatch("abcÉтест日本")
    # U+13683 (Egyptian Hieroglyphs Extended-A, Unicode 16) is not in llama.cpp's table.
    assert not letters.fullmatch("\U00013683")
    inside = regex.compile(bpe.with_llama_categories(r"[^\r\n\p{L}\p{N}]"))
    assert inside.fullmatch(";") and not inside.fullmatch("7") and not inside.fullmatch("x")
    assert bpe.with_llama_categories(r"\s\[\p{N}\]").startswith(r"\s\[[")


def test_split_words(smol: Tokenizer, llama3: Tokenizer) -> None:
    # smollm: every digit alone, then GPT-2's regex.
    assert smol._bpe.split_words("abc 123  x's") == ["abc", " ", "1", "2", "3", " ", " x", "'s"]
    # llama3: numbers in groups of three, newlines kept with the whitespace before them.
    assert llama3._bpe.split_words("x 12345\n\n  y") == ["x", " ", "123", "45", "\n\n", " ", " y"]


def test_scan_and_heap_merges_agree(smol: Tokenizer) -> None:
    ranks = smol._bpe.ranks
    rng = random.Random(7)
    alphabet = "aeiou rstlnmkpbdg" + "Ġ" * 3
    for _ in range(300):
        word = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 40)))
        assert bpe._merge_scan(list(word), ranks) == bpe._merge_heap(list(word), ranks), word


def test_long_words_use_the_heap_and_match(smol: Tokenizer) -> None:
    word = "abracadabra" * 40
    short = [t for w in smol._bpe.split_words(word) for t in smol._bpe._encode_word(w)]
    assert len(word) > bpe._HEAP_THRESHOLD
    assert smol.decode(short) == word
    assert smol.encode(word) == short


def test_ignore_merges_takes_whole_word_tokens(llama3: Tokenizer) -> None:
    assert llama3._bpe.pre.ignore_merges
    assert llama3.encode(" Hello", add_special=False) == [22691]


def test_unknown_pre_tokenizer_message() -> None:
    with pytest.raises(TokenizerError) as info:
        bpe.BpeModel({}, [], "mystery-pre", "m.gguf")
    assert "mystery-pre" in info.value.message and "m.gguf" in info.value.message
    assert "smollm" in info.value.hint


@pytest.fixture(scope="module")
def deepseek_llm(vocab_dir: Path) -> Tokenizer:
    path = vocab_dir / "ggml-vocab-deepseek-llm.gguf"
    return Tokenizer.from_gguf_metadata(open_gguf(path).metadata, path.name)


def test_regexes_without_categories_see_non_ascii_whitespace_as_vertical_tab(deepseek_llm: Tokenizer) -> None:
    # llama.cpp runs a regex without \p{..} through std::wregex on the text with every non-ASCII
    # whitespace replaced by "\x0b": U+2029 and U+3000 then fall outside deepseek-llm's CJK range
    # [ࠀ-一] and its punctuation class [\u3000-。]. Expected ids from llama.cpp (llama-cpp-python 0.3.36).
    assert deepseek_llm.encode("\u2029 ", False, False) == [350, 20535]
    assert deepseek_llm.encode("a  \u3000", False, False) == [64, 243, 88946]
    assert deepseek_llm._bpe.split_words("a  \u3000") == ["a", "  \u3000"]  # one "\\s+$" word


def test_non_ascii_whitespace_is_the_regex_modules() -> None:
    every = "".join(map(chr, [*range(0x80, 0xD800), *range(0xE000, 0x110000)]))
    assert list(bpe.NON_ASCII_WHITESPACE) == [ord(c) for c in regex.findall(r"\s", every)]
