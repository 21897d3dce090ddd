"""``pipx-llama ps``: what a running ``pipx-llama serve`` has loaded, asked through its API
(``GET /api/ps``, Ollama's shape), as ``ollama ps`` does: model, memory, context, since when."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from typing import Any

from pipx_llama.errors import FetchError
from pipx_llama.units import human_bytes

API_KEY_ENV = "PIPX_LLAMA_API_KEY"  # the one `serve` reads


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ps", help="the models a running `pipx-llama serve` has loaded",
                       description="Ask a running server (GET /api/ps) which models it has loaded, how much "
                                   "memory each takes (mapped weights and KV cache), and since when.")
    p.add_argument("--host", default="127.0.0.1", help="the server's address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="the server's port (default 8080)")
    p.add_argument("--url", default=None, help="the server's base URL (instead of --host and --port)")
    p.add_argument("--json", action="store_true", help="print the server's answer as JSON")


def run(args: argparse.Namespace) -> int:
    import httpx

    base = (args.url or f"http://{_host(args.host)}:{args.port}").rstrip("/")
    headers = {"Authorization": f"Bearer {key}"} if (key := os.environ.get(API_KEY_ENV)) else {}
    try:
        r = httpx.get(f"{base}/api/ps", headers=headers, timeout=10.0)
    except httpx.HTTPError as err:
        raise FetchError(f"no pipx-llama server answers at {base}: {err}",
                         "start one with `pipx-llama serve MODEL`, or pass --port/--url") from err
    if r.status_code == 401:
        raise FetchError(f"the server at {base} wants an API key", f"set {API_KEY_ENV} to the server's key")
    if r.status_code != 200:
        raise FetchError(f"the server at {base} answered /api/ps with HTTP {r.status_code}",
                         "is it a pipx-llama server of this version? (`pipx-llama --version`)")
    models = r.json().get("models", [])
    if args.json:
        json.dump({"server": base, "models": models}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    if not models:
        print(f"no model loaded yet by the server at {base} (a model loads on its first request)")
        return 0
    from pipx_llama.cli.tables import render_table

    rows = [[m["name"], m.get("details", {}).get("quantization_level", ""), human_bytes(m["size"]),
             str(m.get("context_length", "")), _since(m.get("loaded_at"))] for m in models]
    print(render_table(["NAME", "QUANT", "MEMORY", "CONTEXT", "LOADED"], rows, wrap=4).text)
    return 0


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _since(stamp: Any) -> str:
    """'3 minutes ago' from Ollama's ISO time."""
    if not stamp:
        return "?"
    try:
        t = datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except ValueError:
        return str(stamp)
    seconds = int((datetime.now(timezone.utc) - t).total_seconds())
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = seconds // size
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return f"{max(seconds, 0)} seconds ago"
