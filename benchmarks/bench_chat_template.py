"""Cost of rendering a chat template: the real SmolLM2 template on short and long conversations.

Chat templates are rendered under a budget (time, output size, work, nesting: see
pipx_llama/tokenizer/chat.py); this measures what a normal render costs with it, per call, after the
template was compiled once (the compile is reported apart).

    python benchmarks/bench_chat_template.py                  # SmolLM2 from the test-data cache
    python benchmarks/bench_chat_template.py --model M.gguf --runs 2000
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import platformdirs


def _default_model() -> Path:
    root = os.environ.get("PIPX_LLAMA_TEST_DATA") or os.path.join(platformdirs.user_cache_dir("pipx-llama"),
                                                                   "test-data")
    return Path(root) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _conversation(turns: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    for i in range(turns):
        messages.append({"role": "user", "content": f"Question {i}: what is {i} times {i + 1}? " * 4})
        messages.append({"role": "assistant", "content": f"It is {i * (i + 1)}. " * 8})
    messages.append({"role": "user", "content": "Thanks!"})
    return messages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="a GGUF with tokenizer.chat_template")
    ap.add_argument("--runs", type=int, default=1000)
    args = ap.parse_args()

    from pipx_llama.formats.gguf import open_gguf
    from pipx_llama.tokenizer import chat

    g = open_gguf(args.model or _default_model())
    template = str(g.metadata["tokenizer.chat_template"])
    g.close()
    t = time.perf_counter()
    chat.render_chat(template, _conversation(0), bos_token="<|im_start|>", eos_token="<|im_end|>")
    print(f"first render (compiles the template): {(time.perf_counter() - t) * 1e3:.2f} ms")
    for turns in (0, 10, 100):
        messages = _conversation(turns)
        times = []
        for _ in range(args.runs):
            t = time.perf_counter()
            out = chat.render_chat(template, messages, bos_token="<|im_start|>", eos_token="<|im_end|>")
            times.append(time.perf_counter() - t)
        print(
            f"{len(messages):4d} messages, {len(out):7d} chars: median "
            f"{statistics.median(times) * 1e6:8.1f} us, "
            f"p90 {sorted(times)[int(0.9 * len(times))] * 1e6:8.1f} us"
        )


if __name__ == "__main__":
    main()
