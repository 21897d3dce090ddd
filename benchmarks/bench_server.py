"""Load test of ``pipx-llama serve``: concurrent clients, bounded requests, throughput and latency.

Starts a server subprocess on SmolLM2 (or uses ``--url``), warms it up, then runs ``--requests``
chat completions from ``--clients`` concurrent clients (short prompts, ``--max-tokens`` each; every
other request streams, so both paths are measured and time-to-first-token is reported). Any non-200
answer or transport error counts as an error; the run is a failure unless there are none.

``--baseline N`` also runs N requests from one client (the aggregate speed-up of continuous
batching is the ratio); ``--llama-server PATH`` runs the same load on llama.cpp's server
(``-np`` = ``--slots``, the same GGUF, threads and context per slot) for a side-by-side.

    python benchmarks/bench_server.py                           # 8 clients, 200 requests, 64 tokens each
    python benchmarks/bench_server.py --baseline 25 --llama-server /work/llama-build/bin/llama-server
    python benchmarks/bench_server.py --clients 4 --requests 50 --max-tokens 16 --json out.json
    python benchmarks/bench_server.py --url http://127.0.0.1:8080 --api-key KEY --model-name NAME
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

TOPICS = ["cats", "the sea", "bread", "rain", "music", "trains", "the moon", "gardens", "snow", "coffee",
          "bicycles", "libraries", "rivers", "owls", "clocks", "mountains"]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def start_server(model: Path, threads: int | None, max_queue: int,
                 slots: int | None = None) -> tuple[subprocess.Popen, str, list[str]]:
    cmd = [sys.executable, "-m", "pipx_llama.cli", "serve", "-m", str(model), "--port", "0", "-c", "1024",
           "--max-queue", str(max_queue), "--preload", "--log-level", "warning"]
    if slots:
        cmd += ["--slots", str(slots)]
    if threads:
        cmd += ["-t", str(threads)]
    env = {k: v for k, v in os.environ.items() if k != "PIPX_LLAMA_API_KEY"}
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env)
    log: list[str] = []
    found = threading.Event()
    url: list[str] = []

    def pump() -> None:
        for line in proc.stderr:
            log.append(line.rstrip("\n"))
            m = re.search(r"serving .* at (http://\S+)", line)
            if m:
                url.append(m.group(1))
                found.set()

    threading.Thread(target=pump, daemon=True).start()
    if not found.wait(180):
        proc.kill()
        sys.exit("the server did not start:\n" + "\n".join(log))
    return proc, url[0], log


def start_llama_server(binary: Path, model: Path, threads: int | None,
                       slots: int) -> tuple[subprocess.Popen, str]:
    """llama.cpp's server on a free loopback port: ``-np`` slots of 1024 tokens each (its -c is the total)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-np", str(slots),
           "-c", str(1024 * slots), "--log-disable"]
    if threads:
        cmd += ["-t", str(threads), "-tb", str(threads)]
    quiet = subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdin=quiet, stdout=quiet, stderr=quiet)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"llama-server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    sys.exit("llama-server did not start")


async def one(client: httpx.AsyncClient, name: str, i: int, max_tokens: int, stream: bool) -> dict:
    body = {"model": name, "max_tokens": max_tokens, "temperature": 0.7, "seed": i, "stream": stream,
            "messages": [{"role": "user", "content": f"Write one sentence about {TOPICS[i % len(TOPICS)]}."}]}
    if stream:
        body["stream_options"] = {"include_usage": True}
    t0 = time.perf_counter()
    out = {"i": i, "stream": stream, "ok": False, "ttft": None, "tokens": 0, "status": None}
    try:
        if not stream:
            r = await client.post("/v1/chat/completions", json=body)
            out["status"] = r.status_code
            if r.status_code == 200:
                out["tokens"] = r.json()["usage"]["completion_tokens"]
                out["ok"] = True
        else:
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                out["status"] = r.status_code
                done = False
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        break
                    if (
                        chunk["choices"]
                        and chunk["choices"][0]["delta"].get("content")
                        and out["ttft"] is None
                    ):
                        out["ttft"] = time.perf_counter() - t0
                    if chunk.get("usage"):
                        out["tokens"] = chunk["usage"]["completion_tokens"]
                out["ok"] = r.status_code == 200 and done
    except httpx.HTTPError as err:
        out["error"] = f"{type(err).__name__}: {err}"
    out["latency"] = time.perf_counter() - t0
    return out


async def run(url: str, key: str | None, name: str, clients: int, requests: int, max_tokens: int) -> tuple:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as client:
        warm = await one(
            client, name, -1, max_tokens, False
        )  # model load and kernel cache outside the timing
        if not warm["ok"]:
            sys.exit(f"warm-up request failed: {warm}")
        counter = iter(range(requests))
        results: list[dict] = []

        async def worker() -> None:
            for i in counter:
                results.append(await one(client, name, i, max_tokens, stream=i % 2 == 1))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
        health = (await client.get("/health")).json()
    return results, wall, health


def measure(url: str, key: str | None, name: str | None, clients: int, requests: int,
            max_tokens: int) -> dict:
    if name is None:
        hdr = {"Authorization": f"Bearer {key}"} if key else {}
        name = httpx.get(url + "/v1/models", headers=hdr, timeout=30).json()["data"][0]["id"]
    results, wall, health = asyncio.run(run(url, key, name, clients, requests, max_tokens))
    ok = [r for r in results if r["ok"]]
    errors = [r for r in results if not r["ok"]]
    lat = [r["latency"] for r in ok]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    figures = {
        "clients": clients,
        "requests": len(results),
        "errors": len(errors),
        "max_tokens": max_tokens,
        "wall_seconds": round(wall, 2),
        "requests_per_second": round(len(ok) / wall, 3),
        "generated_tokens": tokens,
        "generated_tokens_per_second": round(tokens / wall, 2),
        "latency_p50_ms": round(percentile(lat, 0.5) * 1000),
        "latency_p95_ms": round(percentile(lat, 0.95) * 1000),
        "latency_max_ms": round(max(lat) * 1000) if lat else None,
        "stream_ttft_p50_ms": round(percentile(ttft, 0.5) * 1000) if ttft else None,
        "stream_ttft_p95_ms": round(percentile(ttft, 0.95) * 1000) if ttft else None,
        "server_requests": health.get("requests"),
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "error_samples": [str(e) for e in errors[:5]],
    }
    return figures


def show(label: str, f: dict) -> None:
    print(f"{label}: {f['requests']} requests from {f['clients']} clients in {f['wall_seconds']:.1f} s: "
          f"{f['errors']} errors (load average {f['load_average_1min']})")
    print(f"  throughput  {f['requests_per_second']:.2f} req/s, "
          f"{f['generated_tokens_per_second']:.1f} generated tok/s")
    print(f"  latency     p50 {f['latency_p50_ms']} ms, p95 {f['latency_p95_ms']} ms, "
          f"max {f['latency_max_ms']} ms")
    if f["stream_ttft_p50_ms"] is not None:
        print(f"  streaming   time to first token p50 {f['stream_ttft_p50_ms']} ms, "
              f"p95 {f['stream_ttft_p95_ms']} ms")
    for e in f["error_samples"]:
        print(f"  error: {e}")


def run_all(url: str, key: str | None, name: str | None, args: argparse.Namespace) -> dict:
    out = {"clients": measure(url, key, name, args.clients, args.requests, args.max_tokens)}
    if args.baseline:
        out["one_client"] = measure(url, key, name, 1, args.baseline, args.max_tokens)
        out["speedup"] = round(out["clients"]["generated_tokens_per_second"]
                               / max(1e-9, out["one_client"]["generated_tokens_per_second"]), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default=None, help="use this running server instead of starting one")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--model", type=Path, default=None, help="GGUF to serve (default: SmolLM2-135M Q4_1)")
    ap.add_argument("--model-name", default=None, help="model name to request (default: the server's first)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--slots", type=int, default=None,
                    help="the server's parallel slots (default: --clients)")
    ap.add_argument("--baseline", type=int, default=0, metavar="N",
                    help="also run N requests from one client and report the aggregate speed-up")
    ap.add_argument("--llama-server", type=Path, default=None, metavar="PATH",
                    help="also run the load on this llama-server binary (-np = --slots) for comparison")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    slots = args.slots or args.clients

    figures: dict = {}
    if args.url is not None:
        figures["pipx_llama"] = run_all(args.url, args.api_key, args.model_name, args)
    else:
        from bench_engine import default_model

        model = args.model or default_model()
        proc, url, _ = start_server(model, args.threads, max(16, args.clients * 2), slots)
        try:
            figures["pipx_llama"] = run_all(url, None, args.model_name, args)
        finally:
            proc.terminate()
            proc.wait(30)
        if args.llama_server is not None:
            proc, url = start_llama_server(args.llama_server, model, args.threads, slots)
            try:
                figures["llama_server"] = run_all(url, None, None, args)
            finally:
                proc.terminate()
                proc.wait(30)
    errors = 0
    for server, f in figures.items():
        show(f"{server} ({slots} slots)", f["clients"])
        errors += f["clients"]["errors"]
        if "one_client" in f:
            show(f"{server}, one client", f["one_client"])
            print(f"  aggregate speed-up with {args.clients} clients: {f['speedup']}x")
    if "llama_server" in figures:
        ratio = (figures["pipx_llama"]["clients"]["generated_tokens_per_second"]
                 / max(1e-9, figures["llama_server"]["clients"]["generated_tokens_per_second"]))
        figures["ratio_to_llama_server"] = round(ratio, 2)
        print(f"aggregate throughput, pipx-llama / llama-server: {ratio:.2f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
