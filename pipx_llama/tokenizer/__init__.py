"""Tokenizers built from GGUF metadata (``tokenizer``: SPM via ``spm``, byte-level BPE via ``bpe``) and
chat-template rendering (``chat``), matching llama.cpp token for token."""
