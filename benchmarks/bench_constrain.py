"""Constrained decoding libraries on our vocabularies: schema compile time, cost per token, schema coverage.

For each vocabulary (SmolLM2: 49,152 tokens; Qwen2.5: 151,936) and each library that is installed --
llguidance (the one pipx-llama uses), outlines-core and xgrammar (``pip install outlines-core xgrammar``
to compare; xgrammar pulls in torch) -- it builds the library's vocabulary from our ``Tokenizer``,
compiles a JSON schema with nested objects, enums, arrays and a pattern, then walks the tokens of a
valid document: the time per token is computing the next-token mask plus advancing the state (our
mask-to-logits step is timed separately, on llguidance). Coverage: 23 schema features, each checked
with one valid and one invalid document (``ok``: the valid one is accepted and the invalid refused).
With ``--generate``, SmolLM2's generation speed with and without a constraint.

    python benchmarks/bench_constrain.py --smollm2 SmolLM2.gguf --qwen qwen2.5-coder-1.5b.gguf [--generate]
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipx_llama.engine.constrain import Constraint, GrammarError, json_schema_grammar, token_bytes
from pipx_llama.formats.gguf import open_gguf
from pipx_llama.tokenizer.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "role": {"type": "string", "enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {
            "street": {"type": "string"}, "city": {"type": "string"},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "city", "zip"], "additionalProperties": False},
        "scores": {"type": "array", "items": {"type": "number"}},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "address", "scores", "active"],
    "additionalProperties": False,
}
DOC = {"name": "Ada Lovelace", "age": 36, "role": "admin", "tags": ["math", "poetry", "engines"],
       "address": {"street": "12 St James's Square", "city": "London", "zip": "12345"},
       "scores": [1.5, 2.25, 99], "active": True}
SEPARATORS = (", ", ": ")  # the server's JSON formatting (engine/constrain.py JSON_OPTIONS)

COVERAGE: dict[str, tuple[Any, Any, Any]] = {  # feature: (schema, valid document, invalid document)
    "enum": ({"enum": ["a", "b"]}, "a", "c"),
    "const": ({"const": "x"}, "x", "y"),
    "nested object + required": ({"type": "object", "properties": {"o": {"type": "object", "properties": {
        "a": {"type": "integer"}}, "required": ["a"]}}, "required": ["o"]}, {"o": {"a": 1}}, {"o": {}}),
    "minItems/maxItems": ({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3},
                          [1, 2], [1]),
    "minLength/maxLength": ({"type": "string", "minLength": 2, "maxLength": 4}, "abc", "abcdef"),
    "pattern": ({"type": "string", "pattern": "^[a-z]+-[0-9]{2}$"}, "ab-12", "ab-1x"),
    "minimum/maximum": ({"type": "integer", "minimum": 10, "maximum": 20}, 15, 25),
    "exclusiveMinimum": ({"type": "number", "exclusiveMinimum": 0}, 0.5, -1),
    "multipleOf": ({"type": "integer", "multipleOf": 5}, 10, 7),
    "anyOf": ({"anyOf": [{"type": "integer"}, {"type": "string"}]}, "x", True),
    "oneOf": ({"oneOf": [{"type": "integer"}, {"type": "boolean"}]}, True, "x"),
    "allOf": ({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                         {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}]},
              {"a": 1, "b": 2}, {"a": 1}),
    "type list (nullable)": ({"type": ["string", "null"]}, None, 1),
    "$defs/$ref": ({"$defs": {"p": {"type": "object", "properties": {"x": {"type": "integer"}},
                                    "required": ["x"]}},
                    "type": "object", "properties": {"p": {"$ref": "#/$defs/p"}}, "required": ["p"]},
                   {"p": {"x": 1}}, {"p": {"y": 1}}),
    "recursive $ref": ({"$defs": {"n": {"type": "object", "properties": {
        "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/n"}}},
        "required": ["v", "kids"], "additionalProperties": False}}, "$ref": "#/$defs/n"},
        {"v": 1, "kids": [{"v": 2, "kids": []}]}, {"v": 1, "kids": [{"v": "x", "kids": []}]}),
    "additionalProperties: false": ({"type": "object", "properties": {"a": {"type": "integer"}},
                                     "additionalProperties": False}, {"a": 1}, {"a": 1, "b": 2}),
    "additionalProperties schema": ({"type": "object", "additionalProperties": {"type": "integer"}},
                                    {"q": 1}, {"q": "s"}),
    "format date-time": ({"type": "string", "format": "date-time"}, "2024-01-02T03:04:05Z", "yesterday"),
    "format email": ({"type": "string", "format": "email"}, "a@b.co", "nope"),
    "format uuid": ({"type": "string", "format": "uuid"}, "123e4567-e89b-12d3-a456-426614174000", "xyz"),
    "prefixItems": ({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}],
                     "items": False},
                    [1, "a"], ["a", 1]),
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [1, 2], [1, 1]),
    "Pydantic Optional": ({"type": "object", "properties": {
                               "a": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": None}}},
                          {"a": None}, {"a": "x"}),
}


def _dump(value: Any) -> str:
    return json.dumps(value, separators=SEPARATORS)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


class Llguidance:
    name = "llguidance"

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        # builds the vocabulary
        self.c = Constraint(json_schema_grammar({"type": "boolean"}, param="s"), tok, param="s")

    def compile(self, schema: Any) -> Any:
        return Constraint(json_schema_grammar(schema, param="s"), self.tok, param="s")

    def step(self, state: Any, token: int) -> bool:
        if not state.allowed()[token]:
            return False
        state.accept(token)
        return True

    def accepts_end(self, state: Any) -> bool:
        return state.accepting


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok: Tokenizer) -> None:
        import outlines_core

        self.oc = outlines_core
        eog = sorted(tok.stop_ids)
        self.eos = eog[0]
        pieces: dict[bytes, list[int]] = {}
        for i, piece in enumerate(token_bytes(tok)):
            if i not in eog and piece and not piece.startswith(b"\xff"):
                pieces.setdefault(piece, []).append(i)
        self.vocab = outlines_core.Vocabulary(self.eos, pieces)
        self.mask = np.zeros((tok.n_vocab + 31) // 32, dtype=np.int32)

    def compile(self, schema: Any) -> Any:
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema), r"[ ]?")
        return self.oc.Guide(self.oc.Index(regex, self.vocab))

    def step(self, state: Any, token: int) -> bool:
        state.write_mask_into(self.mask.ctypes.data, self.mask.size, 4)
        if not (self.mask[token >> 5] >> (token & 31)) & 1:
            return False
        state.advance(token)
        return True

    def accepts_end(self, state: Any) -> bool:
        return self.eos in state.get_tokens()


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tok: Tokenizer) -> None:
        import xgrammar

        self.xgr = xgrammar
        eog = sorted(tok.stop_ids)
        info = xgrammar.TokenizerInfo([p.removeprefix(b"\xff") for p in token_bytes(tok)],
                                      vocab_type=xgrammar.VocabType.RAW, vocab_size=tok.n_vocab,
                                      stop_token_ids=eog)
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1)
        self.eos = eog[0]
        self.mask = xgrammar.allocate_token_bitmask(1, tok.n_vocab)

    def compile(self, schema: Any) -> Any:
        return self.xgr.GrammarMatcher(self.compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=SEPARATORS))

    def step(self, state: Any, token: int) -> bool:
        state.fill_next_token_bitmask(self.mask)
        if not (int(self.mask[0, token >> 5]) >> (token & 31)) & 1:
            return False
        return state.accept_token(token)

    def accepts_end(self, state: Any) -> bool:
        return state.accept_token(self.eos)


def libraries(tok: Tokenizer) -> list[Any]:
    """The installed libraries, each with its vocabulary built (timed without the import)."""
    out = []
    for cls, module in ((Llguidance, "llguidance"), (OutlinesCore, "outlines_core"), (Xgrammar, "xgrammar")):
        try:
            importlib.import_module(module)
        except ImportError:
            print(f"  {cls.name}: not installed")
            continue
        lib, seconds = _timed(lambda cls=cls: cls(tok))
        lib.setup_seconds = seconds
        out.append(lib)
    return out


def speed(tok: Tokenizer, lib: Any, repeats: int) -> dict[str, float]:
    ids = tok.encode(_dump(DOC), add_special=False)
    compiles, steps = [], []
    for _ in range(repeats):
        state, seconds = _timed(lambda: lib.compile(SCHEMA))
        compiles.append(seconds)
        for t in ids:
            t0 = time.perf_counter()
            ok = lib.step(state, t)
            steps.append(time.perf_counter() - t0)
            if not ok:
                raise AssertionError(f"{lib.name} refused token {t} ({tok.decode([t])!r})")
    # the first compile: xgrammar caches compiled schemas, and a server sees each schema about once
    return {"setup_ms": lib.setup_seconds * 1e3, "compile_ms": compiles[0] * 1e3,
            "token_ms_median": statistics.median(steps) * 1e3, "token_ms_mean": statistics.fmean(steps) * 1e3,
            "token_ms_p95": float(np.percentile(steps, 95)) * 1e3, "tokens": len(ids)}


def coverage(tok: Tokenizer, lib: Any) -> dict[str, str]:
    out = {}
    for feature, (schema, good, bad) in COVERAGE.items():
        try:
            verdicts = []
            for doc in (good, bad):
                state = lib.compile(schema)
                ok = all(lib.step(state, t) for t in tok.encode(_dump(doc), add_special=False))
                verdicts.append(ok and lib.accepts_end(state))
            if verdicts == [True, False]:
                out[feature] = "ok"
            else:
                out[feature] = "rejects valid" if not verdicts[0] else "not enforced"
        except (GrammarError, ValueError, RuntimeError) as err:  # a refusal to compile is a result here
            out[feature] = f"refused: {str(err)[:50]}"
    return out


def mask_apply_ms(tok: Tokenizer) -> float:
    """Median time of our step from llguidance's bitmask to masked logits (the library's part excluded)."""
    c = Constraint(json_schema_grammar(SCHEMA, param="s"), tok, param="s")
    logits = np.random.default_rng(0).standard_normal(tok.n_vocab).astype(np.float32)
    times = []
    for _ in range(200):
        _, seconds = _timed(lambda: c.apply(logits))  # the first call loads (or compiles) the kernel
        times.append(seconds)
    return statistics.median(times) * 1e3


def generation(path: Path, threads: int) -> dict[str, float]:
    from pipx_llama.engine.generate import generate
    from pipx_llama.engine.model import load_model
    from pipx_llama.engine.sampler import GREEDY

    model = load_model(path, threads=threads)
    ctx = model.new_context(1024)
    ask = "Describe a user of a web shop as JSON."
    prompt = model.tokenizer.chat_prompt([{"role": "user", "content": ask}])
    out = {}
    for label, constrained in (("free", False), ("constrained", True)):
        c = None
        if constrained:
            c = Constraint(json_schema_grammar(SCHEMA, param="s"), model.tokenizer, param="s")
        ctx.truncate(0)
        gen = generate(ctx, prompt, max_tokens=96, sampler=GREEDY, constraint=c)
        for _ in gen:
            pass
        out[f"{label}_tok_s"] = gen.stats.generation_tokens_per_second
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smollm2", type=Path, required=True, help="a SmolLM2 GGUF (49,152-token vocabulary)")
    ap.add_argument("--qwen", type=Path, help="a Qwen2.5 GGUF (151,936-token vocabulary)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--generate", action="store_true",
                    help="also SmolLM2's generation speed, free and constrained")
    ap.add_argument("-t", "--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    results: dict[str, Any] = {}
    for label, path in (("smollm2", args.smollm2), ("qwen2.5", args.qwen)):
        if path is None:
            continue
        tok = Tokenizer.from_gguf_metadata(open_gguf(path).metadata, path.name)
        print(f"{label}: {tok.n_vocab} tokens")
        results[label] = {"n_vocab": tok.n_vocab}
        for lib in libraries(tok):
            r = speed(tok, lib, args.repeats)
            results[label][lib.name] = r
            print(f"  {lib.name:13s} vocabulary {r['setup_ms']:7.0f} ms | schema {r['compile_ms']:8.1f} ms | "
                  f"per token median {r['token_ms_median']:.3f} ms, mean {r['token_ms_mean']:.3f} ms, "
                  f"p95 {r['token_ms_p95']:.3f} ms")
            if label == "smollm2":
                cov = coverage(tok, lib)
                results[label][lib.name]["coverage"] = cov
                print(f"  {lib.name:13s} coverage {sum(v == 'ok' for v in cov.values())}/{len(cov)}; not ok: "
                      + ", ".join(f"{k} ({v})" for k, v in cov.items() if v != "ok"))
        results[label]["apply_mask_ms"] = mask_apply_ms(tok)
        print(f"  our mask -> logits step: {results[label]['apply_mask_ms']:.3f} ms")
    if args.generate:
        results["generation"] = generation(args.smollm2, args.threads)
        print(f"SmolLM2 generation, {args.threads} thread(s): {results['generation']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
