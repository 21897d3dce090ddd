"""The inference engine: load a GGUF model, evaluate tokens, sample, generate; pure compute.

This module is the engine's public face: code outside ``pipx_llama.engine`` imports from here only
(the import contract in pyproject.toml checks it), so the modules behind it (``model``, ``kv_cache``,
``arch``, ``kernels``, ...) can change shape without touching their callers. The engine does no
I/O beyond mapping the model file, never prints, and reports through return values and exceptions.

``WEIGHT_KERNELS`` is here for the quantizer: the engine's kernels are the one decoder of each ggml
block type, and the quantizer decodes a quantized source tensor with them before requantizing it.
"""

from __future__ import annotations

from pipx_llama.engine.arch import SUPPORTED_ARCHITECTURES, family_of
from pipx_llama.engine.batch import BatchEval, Part, SlotPool, new_slots
from pipx_llama.engine.constrain import (
    Constraint,
    GrammarError,
    json_in_lark,
    json_schema_grammar,
    lark_grammar,
)
from pipx_llama.engine.generate import Generation, GenerationStats, Piece, generate
from pipx_llama.engine.kernels import WEIGHT_KERNELS
from pipx_llama.engine.model import DEFAULT_BATCH, DEFAULT_CTX, Context, Model, load_model
from pipx_llama.engine.perplexity import PerplexityResult, perplexity, window_perplexity
from pipx_llama.engine.sampler import GREEDY, Sampler, SamplerConfig
from pipx_llama.engine.warmup import (
    COMPILING,
    BackgroundCompile,
    CompileResult,
    WeightTypes,
    cache_is_warm,
    compile_kernels,
    start_compile,
    types_of_tensors,
    warm_up,
    weight_types,
)

__all__ = [
    "COMPILING",
    "BackgroundCompile",
    "CompileResult",
    "WeightTypes",
    "DEFAULT_BATCH",
    "DEFAULT_CTX",
    "GREEDY",
    "SUPPORTED_ARCHITECTURES",
    "WEIGHT_KERNELS",
    "BatchEval",
    "Constraint",
    "Context",
    "Generation",
    "GenerationStats",
    "GrammarError",
    "Model",
    "Part",
    "PerplexityResult",
    "Piece",
    "Sampler",
    "SamplerConfig",
    "SlotPool",
    "cache_is_warm",
    "compile_kernels",
    "family_of",
    "generate",
    "json_in_lark",
    "json_schema_grammar",
    "lark_grammar",
    "load_model",
    "new_slots",
    "perplexity",
    "start_compile",
    "types_of_tensors",
    "warm_up",
    "weight_types",
    "window_perplexity",
]
