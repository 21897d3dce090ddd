"""The file and block formats every other layer reads: GGUF files and ggml's tensor types.

``gguf``: the validating GGUF reader. ``fp16``: float32 <-> fp16/bf16 bit conversions, written once.
``floats``, ``legacy``, ``kquants``: ggml's block formats as data (layouts, numpy references of
dequantization and of the dot products' activation rounding). Both the engine and the quantizer
import these; this package imports neither.
"""
