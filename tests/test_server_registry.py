"""The server's bound on prompt length: a lower bound on the token count, from the text's bytes alone.

The server refuses a prompt that cannot fit the context before tokenizing it, so the bound must
never exceed the real count (that would refuse a prompt that fits). Checked on real vocabularies
(SmolLM2's byte-level BPE, llama.cpp's SPM and BPE test vocabularies) against their tokenizers,
on generated texts that favour what makes tokens long: runs of spaces and newlines, special-token
texts, repeated words, characters outside the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipx_llama.formats.gguf import open_gguf
from pipx_llama.server.registry import PieceBound, piece_bound
from pipx_llama.tokenizer.tokenizer import Tokenizer


def _tokenizer(path: Path) -> Tokenizer:
    g = open_gguf(path)
    try:
        return Tokenizer.from_gguf_metadata(g.metadata, path.name)
    finally:
        g.close()


@dataclass
class Vocab:
    tokenizer: Tokenizer
    bound: PieceBound
    texts: st.SearchStrategy[str]
    longest: int  # id of the token with the longest piece


@pytest.fixture(scope="module", params=["smollm2", "ggml-vocab-llama-spm.gguf", "ggml-vocab-llama-bpe.gguf"])
def vocab(request: pytest.FixtureRequest) -> Vocab:
    if request.param == "smollm2":
        tok = _tokenizer(request.getfixturevalue("smollm2_path"))
    else:
        tok = _tokenizer(request.getfixturevalue("vocab_dir") / request.param)
    by_length = sorted(range(tok.n_vocab), key=lambda i: -len(tok.token_to_piece(i, special=True)))
    return Vocab(tok, piece_bound(tok), _texts(tok, by_length[:20]), by_length[0])


def _texts(tok: Tokenizer, longest: list[int]) -> st.SearchStrategy[str]:
    specials = [tok.token_text(i) for i in range(tok.n_vocab) if tok.is_control(i)][:20]
    pieces = [tok.token_to_piece(i, special=True).decode("utf-8", "replace") for i in longest]
    atoms = st.one_of(
        st.text(max_size=20),
        st.sampled_from([" " * 200, "\n" * 50, "\t \n" * 30, "\u2581" * 20, "hello world ", "é", "\U0001f600",
                         "\ud800", "\x00", *specials, *pieces]),
    )
    return st.lists(atoms, max_size=30).map("".join)


def test_the_bound_is_found(vocab: Vocab) -> None:
    tok = vocab.tokenizer
    pieces = [tok.token_to_piece(i, special=True) for i in range(tok.n_vocab)]
    # a piece's space may be a literal "▁" (3 bytes) of the prompt: see the next test
    assert vocab.bound.max_bytes == max(4, *(len(p) + 2 * p.count(b" ") for p in pieces))
    assert vocab.bound.max_bytes >= len(tok.token_to_piece(vocab.longest, special=True))
    assert vocab.bound.min_tokens("") == 0 and vocab.bound.min_tokens("a") == 1


def test_literal_sentencepiece_markers_stay_above_the_bound(vocab: Vocab) -> None:
    """SentencePiece encodes a prompt's literal "▁" (U+2581, 3 bytes) into its space pieces: 19 of them
    are 57 bytes but 2 tokens with LLaMA's vocabulary, which a bound of 27 bytes per token refused."""
    for n in (1, 2, 16, 19, 64):
        text = "\u2581" * n
        assert vocab.bound.min_tokens(text) <= len(vocab.tokenizer.encode(text, add_special=False)), n


@settings(max_examples=300, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_the_bound_never_exceeds_the_token_count(vocab: Vocab, data: st.DataObject) -> None:
    text = data.draw(vocab.texts)
    for add_special in (True, False):
        assert (vocab.bound.min_tokens(text)
                <= len(vocab.tokenizer.encode(text, add_special=add_special))), repr(text)


def test_the_longest_pieces_repeated_reach_the_bound(vocab: Vocab) -> None:
    """The bound is tight enough to matter: the longest piece, repeated, tokenizes near it."""
    tok = vocab.tokenizer
    text = tok.token_to_piece(vocab.longest, special=True).decode("utf-8", "replace") * 100
    assert (vocab.bound.min_tokens(text) <= len(tok.encode(text, add_special=False))
            <= 3 * vocab.bound.min_tokens(text))


def test_spaces_are_free_when_special_tokens_swallow_them() -> None:
    bound = PieceBound(max_bytes=10, spaces_free=True)
    assert bound.min_tokens(" " * 1000) == 0
    assert bound.min_tokens("a" * 25 + "\n" * 1000) == 3
    assert PieceBound(max_bytes=10, spaces_free=False).min_tokens(" " * 1000) == 100
    assert PieceBound(max_bytes=3, spaces_free=False).min_tokens("\ud800") == 1  # U+FFFD: 3 bytes


def test_default_parallel_counts_every_slots_kv_cache():
    from pipx_llama.errors import UsageError
    from pipx_llama.server.registry import MAX_DEFAULT_PARALLEL, check_slots_fit, default_parallel

    kv = 100 << 20
    assert default_parallel(kv, None) == 1
    assert default_parallel(kv, 0) == 1
    assert default_parallel(kv, int(2.5 * kv / 0.9)) == 2  # room for one more cache than the first
    assert default_parallel(kv, 100 * kv) == MAX_DEFAULT_PARALLEL
    check_slots_fit(3, kv, int(2 * kv / 0.9) + 1)
    check_slots_fit(8, kv, None)
    with pytest.raises(UsageError, match="3 parallel slots need 200 MiB more"):
        check_slots_fit(3, kv, kv)
