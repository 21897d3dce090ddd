"""Tokenizer metadata as llama.cpp's converters write it: pre-tokenizer detection by chkhsh, SPM and BPE
vocabs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from convert_helpers import (
    BYTELEVEL_POST,
    LLAMA3_PRE_TOKENIZER,
    SMOLLM_PRE_TOKENIZER,
    llama3_post_processor,
    llama_tokenizer_model,
    read_vocab_cases,
    tokenizer_json_from_gguf,
)

from pipx_llama.convert.vocab import (
    CONTROL,
    NORMAL,
    UNUSED,
    USER_DEFINED,
    HfTokenizer,
    bpe_vocab,
    detect_pre,
    load_vocab,
    spm_vocab,
)
from pipx_llama.errors import ModelFileError, UnsupportedModelError
from pipx_llama.formats.gguf import open_gguf

BPE = "ggml-vocab-llama-bpe.gguf"
SPM = "ggml-vocab-llama-spm.gguf"


def _meta(path: Path) -> dict:
    g = open_gguf(path)
    try:
        return dict(g.metadata)
    finally:
        g.close()


@pytest.fixture(scope="module")
def llama3_meta(vocab_dir) -> dict:
    return _meta(vocab_dir / BPE)


@pytest.fixture(scope="module")
def llama3_tokenizer(llama3_meta) -> HfTokenizer:
    tj = tokenizer_json_from_gguf(llama3_meta, LLAMA3_PRE_TOKENIZER,
                                  llama3_post_processor("<|begin_of_text|>", 128000), ignore_merges=True)
    return HfTokenizer(tj, "llama3 tokenizer.json")


@pytest.fixture(scope="module")
def smollm_meta(smollm2_path) -> dict:
    return _meta(smollm2_path)


def test_llama3_pre_tokenizer_is_detected(llama3_tokenizer):
    assert detect_pre(llama3_tokenizer) == "llama-bpe"


def test_smollm_pre_tokenizer_is_detected(smollm_meta):
    tok = HfTokenizer(tokenizer_json_from_gguf(smollm_meta, SMOLLM_PRE_TOKENIZER, BYTELEVEL_POST), "smollm")
    assert detect_pre(tok) == "smollm"


def test_unknown_pre_tokenizers_are_refused(smollm_meta):
    # SmolLM's vocabulary with another pre-tokenizer (which leading spaces are split off differs)
    prefixed = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    tok = HfTokenizer(tokenizer_json_from_gguf(smollm_meta, prefixed, BYTELEVEL_POST), "gpt2-style")
    with pytest.raises(UnsupportedModelError, match="chkhsh [0-9a-f]{64}"):
        detect_pre(tok)
    odd = {"type": "Metaspace", "replacement": "▁"}
    with pytest.raises(UnsupportedModelError, match="Metaspace"):
        detect_pre(HfTokenizer(tokenizer_json_from_gguf(smollm_meta, odd, None), "odd"))


def test_tokenizer_json_interpreter_matches_hugging_face_on_llama_cpps_cases(vocab_dir, llama3_tokenizer):
    # llama.cpp generated these .out files with Hugging Face's tokenizer (without special tokens).
    for text, ids in read_vocab_cases(vocab_dir, BPE):
        assert llama3_tokenizer.encode(text, add_special_tokens=False) == ids, text
    assert llama3_tokenizer.encode("Hello")[0] == 128000  # TemplateProcessing adds BOS


def test_merges_in_either_json_format(smollm_meta):
    a = tokenizer_json_from_gguf(smollm_meta, SMOLLM_PRE_TOKENIZER, BYTELEVEL_POST, merges_as_pairs=True)
    b = tokenizer_json_from_gguf(smollm_meta, SMOLLM_PRE_TOKENIZER, BYTELEVEL_POST, merges_as_pairs=False)
    text = "Merges written as pairs or as strings: 12345 tokens!"
    assert HfTokenizer(a, "a").encode(text) == HfTokenizer(b, "b").encode(text)


def _bpe_dir(tmp_path: Path, meta: dict, **config) -> Path:
    (tmp_path / "tokenizer.json").write_text(
        json.dumps(tokenizer_json_from_gguf(meta, SMOLLM_PRE_TOKENIZER, BYTELEVEL_POST), ensure_ascii=False))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def test_bpe_vocab_like_get_vocab_base(tmp_path, smollm_meta):
    tj = tokenizer_json_from_gguf(smollm_meta, SMOLLM_PRE_TOKENIZER, BYTELEVEL_POST)
    tj["added_tokens"].append({"id": 100, "content": "▁user▁word", "special": False, "normalized": True})
    tj["added_tokens"].append(
        {"id": 101, "content": "<|looks_special|>", "special": False, "normalized": False}
    )
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"})
    )
    v = bpe_vocab(tmp_path, vocab_size=49160)
    assert v.model == "gpt2" and v.pre == "smollm"
    assert len(v.tokens) == 49160 and v.tokens[49155] == "[PAD49155]" and v.token_types[49155] == UNUSED
    assert v.tokens[100] == " user word" and v.token_types[100] == USER_DEFINED
    assert v.token_types[101] == CONTROL and v.token_types[0] == CONTROL and v.token_types[200] == NORMAL
    assert v.special_ids == {"bos": 1, "eos": 2}
    assert v.merges == list(smollm_meta["tokenizer.ggml.merges"])
    with pytest.raises(ModelFileError, match="ids up to"):
        bpe_vocab(tmp_path, vocab_size=1000)


def test_llama_rules_for_bpe_vocabularies(tmp_path, smollm_meta):
    v = load_vocab(_bpe_dir(tmp_path, smollm_meta, add_prefix_space=False, add_bos_token=True))
    assert v.add_space_prefix is False
    assert v.add_special["bos"] is False  # 49152 tokens: llama.cpp's "granite small models" rule


def test_sentencepiece_json_tokenizers_need_tokenizer_model(tmp_path, smollm_meta):
    tj = tokenizer_json_from_gguf(smollm_meta, SMOLLM_PRE_TOKENIZER, BYTELEVEL_POST)
    tj["model"]["byte_fallback"] = True
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(UnsupportedModelError) as err:
        load_vocab(tmp_path)
    assert "tokenizer.model" in err.value.hint


def test_no_tokenizer_at_all(tmp_path):
    with pytest.raises(ModelFileError, match="neither tokenizer.model nor tokenizer.json"):
        load_vocab(tmp_path)


@pytest.fixture(scope="module")
def llama_spm(vocab_dir) -> tuple[dict, bytes]:
    m = _meta(vocab_dir / SPM)
    return m, llama_tokenizer_model(m["tokenizer.ggml.tokens"], m["tokenizer.ggml.scores"],
                                    m["tokenizer.ggml.token_type"])


def test_spm_vocab_equals_llama_cpps(tmp_path, llama_spm):
    m, model = llama_spm
    (tmp_path / "tokenizer.model").write_bytes(model)
    v = spm_vocab(tmp_path / "tokenizer.model", tmp_path)
    assert v.tokens == list(m["tokenizer.ggml.tokens"])
    np.testing.assert_array_equal(np.array(v.scores, np.float32), m["tokenizer.ggml.scores"])
    assert v.token_types == [int(t) for t in m["tokenizer.ggml.token_type"]]
    assert v.special_ids == {"bos": 1, "eos": 2, "unk": 0}
    assert v.add_special == {"bos": True, "eos": False}
    assert (v.model, v.pre) == ("llama", "default")


def test_spm_added_tokens_and_padding(tmp_path, llama_spm):
    _, model = llama_spm
    (tmp_path / "tokenizer.model").write_bytes(model)
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<pad>": 32000}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "bos_token": "<s>",
        "added_tokens_decoder": {"32001": {"content": "<|im_end|>", "special": False},
                                 "32002": {"content": "▁hi", "special": False}},
    }))
    v = spm_vocab(tmp_path / "tokenizer.model", tmp_path, vocab_size=32004)
    assert v.tokens[32000:] == ["<pad>", "<|im_end|>", " hi", "[PAD32003]"]
    assert v.token_types[32000:] == [USER_DEFINED, CONTROL, USER_DEFINED, UNUSED]
    assert v.scores[32000:] == [-1000.0, -1000.0, -1000.0, -10000.0]
    assert v.add_special["bos"] is False


def test_a_tiktoken_file_is_not_a_sentencepiece_model(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"IQ== 0\nIg== 1\n")
    with pytest.raises(ModelFileError, match="not a SentencePiece model"):
        load_vocab(tmp_path)


def test_a_malformed_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a": 0}},
                                                         "added_tokens": [{"content": "<x>"}]}))
    with pytest.raises(ModelFileError, match="not a valid tokenizer.json"):
        load_vocab(tmp_path)
