"""Tokenizer against llama.cpp: its vocab test files, the SmolLM2 golden ids, and hand-picked cases.

The hand-picked expectations below were produced with llama.cpp itself (llama-cpp-python 0.3.36:
``Llama(vocab_only=True).tokenize(text, add_bos=add_special, special=parse_special)``).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import VOCAB_NAMES

from pipx_llama.errors import TokenizerError, UsageError
from pipx_llama.formats.gguf import open_gguf
from pipx_llama.tokenizer.spm import ATTR_CONTROL, ATTR_NORMAL, ATTR_UNUSED
from pipx_llama.tokenizer.tokenizer import StreamDecoder, Tokenizer

SPM = "ggml-vocab-llama-spm.gguf"
BPE = "ggml-vocab-llama-bpe.gguf"


def read_vocab_cases(vocab_dir: Path, name: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's tests/test-tokenizer-0.cpp ``read_tests``: inputs split on the separator line."""
    raw = (vocab_dir / (name + ".inp")).read_bytes().decode("utf-8")
    sep = "\n__ggml_vocab_test__\n"
    inputs = []
    pos = 0
    while pos < len(raw):
        nxt = raw.find(sep, pos)
        if nxt < 0:
            inputs.append(raw[pos:])
            break
        inputs.append(raw[pos:nxt])
        pos = nxt + len(sep)
    outputs = (vocab_dir / (name + ".out")).read_bytes().decode("utf-8").splitlines()
    assert len(inputs) == len(outputs), "input and output files have different numbers of tests"
    return [(s, [int(t) for t in o.split()]) for s, o in zip(inputs, outputs)]


@pytest.fixture(scope="module")
def spm(vocab_dir: Path) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(open_gguf(vocab_dir / SPM).metadata, SPM)


@pytest.fixture(scope="module")
def bpe(vocab_dir: Path) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(open_gguf(vocab_dir / BPE).metadata, BPE)


@pytest.fixture(scope="module")
def smol(smollm2_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(open_gguf(smollm2_path).metadata, smollm2_path.name)


@pytest.fixture(params=["spm", "bpe", "smol"])
def any_tok(request: pytest.FixtureRequest) -> Tokenizer:
    return request.getfixturevalue(request.param)


# -- llama.cpp's own vocab tests ---------------------------------------------------------------


@pytest.mark.parametrize("name", VOCAB_NAMES)
def test_llama_cpp_vocab_cases(vocab_dir: Path, name: str) -> None:
    tok = Tokenizer.from_gguf_metadata(open_gguf(vocab_dir / name).metadata, name)
    cases = read_vocab_cases(vocab_dir, name)
    assert len(cases) > 30
    # test-tokenizer-0 tokenizes with add_special=false, parse_special=false.
    failures = [(text, ids) for text, ids in cases if tok.encode(text, False, False) != ids]
    assert not failures


def test_golden_prompt_ids(smol: Tokenizer, golden: dict) -> None:
    for case in golden["cases"]:
        assert smol.encode(case["prompt"]) == case["prompt_ids"], case["prompt"]


def test_golden_perplexity_ids(smol: Tokenizer, golden: dict, ppl_text_path: Path) -> None:
    ids = smol.encode(ppl_text_path.read_text(encoding="utf-8"))
    expected = golden["perplexity"]["ids"]
    assert ids[: len(expected)] == expected


# -- hand-picked cases from llama.cpp: (text, [add+parse, add, parse, neither]) -----------------

SPM_CASES = [
    ("Hello world", [[1, 15043, 3186], [1, 15043, 3186], [15043, 3186], [15043, 3186]]),
    (" Hello", [[1, 29871, 15043], [1, 29871, 15043], [29871, 15043], [29871, 15043]]),
    (
        "<s>Hello</s> there",
        [
            [1, 1, 15043, 2, 29871, 727],
            [1, 529, 29879, 29958, 10994, 829, 29879, 29958, 727],
            [1, 15043, 2, 29871, 727],
            [529, 29879, 29958, 10994, 829, 29879, 29958, 727],
        ],
    ),
    (
        "a<unk>b",
        [
            [1, 263, 0, 289],
            [1, 263, 29966, 2960, 29958, 29890],
            [263, 0, 289],
            [263, 29966, 2960, 29958, 29890],
        ],
    ),
    ("\n\n  x", [[1, 29871, 13, 13, 29871, 921]] * 2 + [[29871, 13, 13, 29871, 921]] * 2),
    (
        "🦙 你好",
        [[1, 29871, 243, 162, 169, 156, 29871, 30919, 31076]] * 2
        + [[29871, 243, 162, 169, 156, 29871, 30919, 31076]] * 2,
    ),
]
SMOL_CASES = [
    ("Hello world", [[19556, 905]] * 4),
    (" Hello", [[38699]] * 4),
    ("<s>Hello</s> there", [[44, 99, 46, 19556, 9617, 99, 46, 665]] * 4),
    (
        "<|im_start|>user\nHi<|im_end|>",
        [
            [1, 4093, 198, 26843, 2],
            [44, 108, 306, 79, 3738, 108, 46, 4093, 198, 26843, 44, 108, 306, 79, 486, 108, 46],
        ]
        * 2,
    ),
    ("\n\n  x", [[8866, 1792]] * 4),
    ("🦙 你好", [[10813, 116, 243, 216, 18645, 250, 48392, 138]] * 4),
    ("\U00013683;d", [[187, 237, 244, 221, 43, 84]] * 4),
]
BPE_CASES = [
    ("Hello world", [[128000, 9906, 1917]] * 2 + [[9906, 1917]] * 2),
    ("\n\n  x", [[128000, 271, 220, 865]] * 2 + [[271, 220, 865]] * 2),
    (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
        [
            [128000, 128000, 128006, 882, 128007, 271, 13347, 128009],
            [128000, 27, 91, 7413, 3659, 4424, 91, 1822, 91, 2527, 8932, 851, 91, 29, 882, 27, 91, 408, 8932]
            + [851, 91, 1363, 13347, 27, 91, 68, 354, 851, 91, 29],
            [128000, 128006, 882, 128007, 271, 13347, 128009],
            [27, 91, 7413, 3659, 4424, 91, 1822, 91, 2527, 8932, 851, 91, 29, 882, 27, 91, 408, 8932]
            + [851, 91, 1363, 13347, 27, 91, 68, 354, 851, 91, 29],
        ],
    ),
    ("🦙 你好", [[128000, 9468, 99, 247, 118195, 53901]] * 2 + [[9468, 99, 247, 118195, 53901]] * 2),
    # U+13683 is a letter for Unicode 16 but unassigned in llama.cpp's table: it must not join "d".
    ("\U00013683;d", [[128000, 172, 241, 248, 225, 26, 67]] * 2 + [[172, 241, 248, 225, 26, 67]] * 2),
]
FLAGS = [(True, True), (True, False), (False, True), (False, False)]


@pytest.mark.parametrize(("fixture", "cases"), [("spm", SPM_CASES), ("smol", SMOL_CASES), ("bpe", BPE_CASES)])
def test_special_handling_matches_llama_cpp(
    request: pytest.FixtureRequest, fixture: str, cases: list
) -> None:
    tok = request.getfixturevalue(fixture)
    for text, expected in cases:
        for (add_special, parse_special), ids in zip(FLAGS, expected):
            assert tok.encode(text, add_special, parse_special) == ids, (text, add_special, parse_special)


def test_empty_text(spm: Tokenizer, bpe: Tokenizer, smol: Tokenizer) -> None:
    assert spm.encode("") == [1]
    assert spm.encode("", add_special=False) == []
    assert bpe.encode("") == [128000]
    assert smol.encode("") == []


# -- special ids, stop tokens, pieces ---------------------------------------------------------


def test_special_ids(spm: Tokenizer, bpe: Tokenizer, smol: Tokenizer) -> None:
    assert (spm.bos_id, spm.eos_id, spm.eot_id, spm.add_bos, spm.add_eos) == (1, 2, None, True, False)
    assert spm.stop_ids == {2}
    assert (bpe.bos_id, bpe.eos_id, bpe.eot_id, bpe.add_bos) == (128000, 128001, 128009, True)
    assert bpe.stop_ids == {128001, 128009}
    assert (smol.bos_id, smol.eos_id, smol.add_bos, smol.n_vocab) == (1, 2, False, 49152)
    # <|endoftext|>, <|im_end|>, and <reponame> (taken as the FIM repo token) end generation in llama.cpp.
    assert smol.stop_ids == {0, 2, 4}
    assert smol.eot_id == 2
    assert smol.is_eog(2) and not smol.is_eog(1)
    assert smol.bos_token == "<|im_start|>" and smol.eos_token == "<|im_end|>"


def test_control_tokens_and_pieces(spm: Tokenizer, smol: Tokenizer) -> None:
    assert smol.is_control(1) and smol.is_control(0) and not smol.is_control(504)
    assert smol.token_to_piece(1) == b""
    assert smol.token_to_piece(1, special=True) == b"<|im_start|>"
    assert smol.token_to_piece(38699) == b" Hello"
    assert smol.token_text(38699) == "ĠHello"
    assert smol.token_id("<|im_end|>") == 2
    assert spm.token_to_piece(15043) == b" Hello"
    assert spm.token_to_piece(243) == b"\xf0"  # byte token <0xF0>
    assert spm.token_to_piece(0) == b"" and spm.token_to_piece(0, special=True) == b"<unk>"


def test_decode_matches_llama_cpp(spm: Tokenizer, bpe: Tokenizer, smol: Tokenizer) -> None:
    assert spm.decode([15043, 3186]) == "Hello world"  # the SPM prefix space is dropped
    # After a leading BOS the space goes as in llama-cpp-python's detokenize.
    assert spm.decode([1, 15043, 3186]) == "Hello world"
    assert spm.decode([1, 15043, 3186], special=True) == "<s> Hello world"
    assert smol.decode([1, 4093, 198, 26843, 2]) == "user\nHi"
    assert smol.decode([1, 4093, 198, 26843, 2], special=True) == "<|im_start|>user\nHi<|im_end|>"
    # llama-bpe has clean_up_tokenization_spaces on, as llama.cpp's detokenize applies it.
    ids = bpe.encode("Hello , world 's  it 've", add_special=False)
    assert bpe.decode(ids) == "Hello, world's  it've"
    assert bpe.decode(ids, clean_spaces=False) == "Hello , world 's  it 've"
    assert bpe.decode(bpe.encode("I don't know . Right ?", add_special=False)) == "I don't know. Right?"
    # SmolLM2 does not clean spaces.
    assert smol.decode(smol.encode("Hello , world 's")) == "Hello , world 's"
    # A character cut in half decodes to U+FFFD.
    assert spm.decode([243, 162]) == "\ufffd"


ROUND_TRIP = [
    "Hello world",
    " leading space and trailing  ",
    "multi\nline\n\n\ttabs\r\nCRLF",
    "Ünïcödé – “quotes” and emoji 🦙🚀👨‍👩‍👧 and CJK 日本語の文章, 한국어",
    "code: def f(x):\n    return x ** 2  # comment",
    "numbers 1234567890 3.14159 -42",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "",
]


def test_round_trip(any_tok: Tokenizer) -> None:
    controls = [t for t in ("<|im_start|>", "<|im_end|>") if any_tok.token_id(t) is not None]
    for text in ROUND_TRIP:
        plain = text
        for t in controls:
            if any_tok.is_control(any_tok.token_id(t)):
                plain = plain.replace(t, "")
        for add_special in (True, False):
            ids = any_tok.encode(text, add_special=add_special)
            assert any_tok.decode(ids, clean_spaces=False) == plain
        ids = any_tok.encode(text, add_special=False)
        assert any_tok.decode(ids, special=True, clean_spaces=False) == text
        if any_tok.bos_id is not None:
            with_bos = any_tok.decode([any_tok.bos_id, *ids], special=True, clean_spaces=False)
            bos_text = any_tok.bos_token
            # An SPM text keeps its prefix space after the BOS text, as in llama.cpp.
            assert with_bos in (bos_text + text, bos_text + " " + text)


# -- streaming ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["spm", "bpe", "smol"])
def test_stream_decoder_holds_back_partial_characters(request: pytest.FixtureRequest, fixture: str) -> None:
    tok: Tokenizer = request.getfixturevalue(fixture)
    text = "Emoji 🦙🚀 and CJK 你好世界, Ünïcödé done."
    ids = tok.encode(text, add_special=False)
    stream = StreamDecoder(tok)
    chunks = []
    held_back = 0
    for tid in ids:
        chunk = stream.feed(tid)
        assert "\ufffd" not in chunk
        held_back += stream.pending
        chunks.append(chunk)
    chunks.append(stream.flush())
    assert held_back > 0  # some character really was split across tokens
    joined = "".join(chunks)
    # Streaming keeps the SPM prefix space that decode() drops.
    assert joined.lstrip(" ") == text
    assert joined == b"".join(tok.token_to_piece(t) for t in ids).decode("utf-8")


def test_stream_decoder_flushes_incomplete_tail(spm: Tokenizer) -> None:
    stream = spm.stream_decoder()
    assert stream.feed(spm.token_id("<0xF0>")) == ""
    assert stream.feed(spm.token_id("<0x9F>")) == ""
    assert stream.pending
    assert stream.flush() == "\ufffd"
    assert not stream.pending
    assert stream.feed(15043) == " Hello"


# -- errors and limits ----------------------------------------------------------------------------


def _meta(**over: object) -> dict:
    meta: dict = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": ["a", "b", "ab"],
        "tokenizer.ggml.merges": ["a b"],
    }
    meta.update(over)
    return {k: v for k, v in meta.items() if v is not None}


def test_errors_name_the_problem() -> None:
    with pytest.raises(TokenizerError, match=r"model\.gguf: unknown pre-tokenizer 'fancy-new'"):
        Tokenizer.from_gguf_metadata(_meta(**{"tokenizer.ggml.pre": "fancy-new"}), "model.gguf")
    with pytest.raises(TokenizerError, match="unsupported tokenizer model 'bert'"):
        Tokenizer.from_gguf_metadata(_meta(**{"tokenizer.ggml.model": "bert"}), "x.gguf")
    with pytest.raises(TokenizerError, match="tokenizer.ggml.model is missing"):
        Tokenizer.from_gguf_metadata(_meta(**{"tokenizer.ggml.model": None}), "x.gguf")
    with pytest.raises(TokenizerError, match="tokenizer.ggml.tokens"):
        Tokenizer.from_gguf_metadata(_meta(**{"tokenizer.ggml.tokens": None}), "x.gguf")
    with pytest.raises(TokenizerError, match="without merges"):
        Tokenizer.from_gguf_metadata(_meta(**{"tokenizer.ggml.merges": None}), "x.gguf")
    with pytest.raises(TokenizerError, match="token_type has 1 entries for 3 tokens"):
        Tokenizer.from_gguf_metadata(_meta(**{"tokenizer.ggml.token_type": [1]}), "x.gguf")
    with pytest.raises(TokenizerError, match="add_bos_token should be bool"):
        Tokenizer.from_gguf_metadata(_meta(**{"tokenizer.ggml.add_bos_token": "yes"}), "x.gguf")


def test_tiny_bpe_and_usage_errors() -> None:
    tok = Tokenizer.from_gguf_metadata(_meta(), "tiny.gguf")
    assert tok.encode("abab") == [2, 2]
    assert tok.encode("ba") == [1, 0]
    with pytest.raises(TokenizerError, match="out of range"):
        tok.decode([3])
    with pytest.raises(UsageError):
        tok.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        tok.token_to_piece("1")  # type: ignore[arg-type]
    # The default BPE BOS/EOS id (11) is out of range here, so a forced BOS has nothing to add.
    needs_bos = Tokenizer.from_gguf_metadata(_meta(**{"tokenizer.ggml.add_bos_token": True}), "tiny.gguf")
    with pytest.raises(TokenizerError, match="adds a BOS token but the vocabulary has none"):
        needs_bos.encode("ab")
    assert needs_bos.encode("ab", add_special=False) == [2]


def test_lone_surrogates_become_replacement_characters(smol: Tokenizer) -> None:
    assert smol.encode("a\udc80b") == smol.encode("a\ufffdb")


def test_build_and_encode_speed(vocab_dir: Path, smollm2_path: Path) -> None:
    text = (Path(__file__).read_text(encoding="utf-8") * 2)[:6000]
    for path in (vocab_dir / BPE, smollm2_path):
        meta = open_gguf(path).metadata
        t0 = time.perf_counter()
        tok = Tokenizer.from_gguf_metadata(meta, path.name)
        t1 = time.perf_counter()
        tok.encode(text)
        t2 = time.perf_counter()
        # Generous bounds for a shared machine; typical figures are ~0.05 s and ~0.05 s.
        assert t1 - t0 < 1.0, f"building {path.name} took {t1 - t0:.2f} s"
        assert t2 - t1 < 2.0, f"encoding 6 KB with {path.name} took {t2 - t1:.2f} s"


def test_control_tokens_named_unused_are_marked_unused() -> None:
    # llama.cpp's load(): a control token whose text contains "unused" also gets LLAMA_TOKEN_ATTR_UNUSED
    # (Gemma's <unused0>...), what llama_vocab_get_attr reports.
    meta = _meta(**{
        "tokenizer.ggml.tokens": ["a", "b", "ab", "<unused0>", "<ctrl>", "unused"],
        "tokenizer.ggml.token_type": [1, 1, 1, 3, 3, 1],
    })  # fmt: skip
    tok = Tokenizer.from_gguf_metadata(meta, "tiny.gguf")
    assert tok.token_attr(3) == ATTR_CONTROL | ATTR_UNUSED
    assert tok.token_attr(4) == ATTR_CONTROL
    assert tok.token_attr(5) == ATTR_NORMAL
