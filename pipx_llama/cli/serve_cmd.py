"""``pipx-llama serve [MODEL …] [-m FILE.gguf …]``: the OpenAI- and Ollama-compatible HTTP server.

Named models are prepared in the store (fetched, converted, quantized: the road every command takes,
``cli/road.py``) before the server starts; every model is loaded on its first request and kept. The
socket is bound here, before uvicorn starts, so a port in use is a plain error and ``--port 0`` picks
a free port (the URL is printed). ``/`` is a chat page; ``--open`` opens it in the default browser
once the server is up.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
import threading
import time
import webbrowser
from pathlib import Path
from typing import TYPE_CHECKING

from pipx_llama.cli import road
from pipx_llama.cli.options import DEFAULT_MODEL, add_cache_type_options, add_sampling_options, sampler_config
from pipx_llama.errors import UsageError
from pipx_llama.units import parse_size

API_KEY_ENV = "PIPX_LLAMA_API_KEY"
# How long the event loop's thread may hold the GIL while the engine thread waits for it (Python's default
# is 5 ms). The engine thread takes the GIL back after every pass and every wake-up it sends the loop; a
# loop busy with eight streams kept it waiting up to the whole interval, which py-spy showed as 8.3% of the
# engine thread in one socket write. bench_server.py --baseline 25 --slots 8 --threads 2, SmolLM2, a Zen 5
# EPYC, 8 clients' generated tok/s: 5 ms 955 / 1003 / 862 / 1028 / 924 / 929, p95 latency 461-513 ms;
# 1 ms 1047 / 1115 / 1133, p95 369-399 ms; 0.5 ms 983-1178 (six runs), 0.2 ms 985-1142 (three); one
# client 321-380 tok/s throughout.
GIL_SWITCH_INTERVAL_S = 0.001

if TYPE_CHECKING:
    import uvicorn

LOOPBACK_NAMES = ["localhost", "127.0.0.1", "::1", "[::1]"]


def _size(text: str) -> int:
    """A positive size for argparse (units as everywhere: :mod:`pipx_llama.units`)."""
    try:
        value = parse_size(text)
    except UsageError as err:
        raise argparse.ArgumentTypeError(f"{err.message} ({err.hint})") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve models over an OpenAI- and Ollama-compatible HTTP API")
    p.add_argument(
        "model",
        nargs="*",
        default=[],
        help=f"model names or aliases, prepared in the store when missing (default: {DEFAULT_MODEL} "
        "unless -m is given)",
    )
    p.add_argument("-m", "--model-file", action="append", default=[], type=Path, metavar="PATH.gguf",
                   help="also serve this GGUF file, named after its file name without .gguf (repeatable)")
    road.add_road_options(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; any other address needs an API key)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 = any free port)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on the API (or set {API_KEY_ENV}, which keeps "
                        "the key out of the process list)")
    p.add_argument("--max-queue", type=int, default=16, metavar="N",
                   help="requests that may wait for the engine; more get 503 with Retry-After (default 16)")
    p.add_argument("--max-body", type=_size, default=4 << 20, metavar="SIZE",
                   help="largest request body accepted, e.g. 4M (4,000,000 bytes) or 4Mi (4,194,304; the "
                        "default); larger ones get 413")
    p.add_argument("--max-connections", type=int, default=64, metavar="N",
                   help="open connections at once; requests on more get 503 (default 64)")
    p.add_argument("--header-timeout", type=float, default=20.0, metavar="SECONDS",
                   help="a connection must send a request's headers within this time of opening or of its "
                        "previous answer, or it is closed (default 20)")
    p.add_argument("--body-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="a request's body must arrive within this time of its headers, or it gets 408 "
                        "(default 60)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN call the API (repeatable; '*' = any). Pages on "
                        "localhost may always")
    # llama-server's -np; its long name --parallel is already the download connections of the road options
    p.add_argument("-np", "--slots", type=int, default=None, metavar="N",
                   help="requests each model generates at once, batched, each with its own KV cache of "
                        "--ctx-size (default: as many as fit in RAM, at most 4)")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: physical cores)")
    p.add_argument("-c", "--ctx-size", type=int, default=None,
                   help="context size per model in tokens (default: the model's, at most 4096)")
    add_sampling_options(p)
    add_cache_type_options(p)
    p.add_argument("--preload", action="store_true", help="load every model at start-up, not on first use")
    p.add_argument("--open", action="store_true", help="open the chat page in the default web browser")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="server log detail (default info: one line per request)")


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from pipx_llama.server import ModelRegistry, ModelSpec, ServerSettings, create_app
    from pipx_llama.server.protocol import ConnectionLimits, uvicorn_config

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    loopback = is_loopback(args.host)
    if not loopback and not api_key:
        raise UsageError(f"refusing to listen on {args.host} without an API key: anyone who can reach this "
                         "machine could use it",
                         f"pass --api-key KEY (or set {API_KEY_ENV}), or listen on 127.0.0.1 (the default)")
    if args.max_queue < 0:
        raise UsageError(f"--max-queue must be 0 or more, got {args.max_queue}", "pass --max-queue 16")
    if args.ctx_size is not None and args.ctx_size < 16:
        raise UsageError(f"--ctx-size {args.ctx_size} is too small", "pass -c 512 or more, or leave it out")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"threads must be at least 1, got {args.threads}", "pass -t 1 or more")
    if args.slots is not None and args.slots < 1:
        raise UsageError(f"--slots must be at least 1, got {args.slots}", "pass --slots 1 or more")
    sampling = sampler_config(args)
    if args.max_connections < 1:
        raise UsageError(f"--max-connections must be at least 1, got {args.max_connections}",
                         "pass --max-connections 64")
    for flag, value in (("--header-timeout", args.header_timeout), ("--body-timeout", args.body_timeout)):
        if not value > 0:  # also refuses nan
            raise UsageError(f"{flag} must be a positive number of seconds, got {value:g}", f"pass {flag} 30")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} is not a port number", "pass a port between 1 and 65535, or 0")

    specs = _specs(args, ModelSpec)
    registry = ModelRegistry(specs, threads=args.threads, ctx_size=args.ctx_size,
                             cache_types=(args.cache_type_k, args.cache_type_v), parallel=args.slots)
    settings = ServerSettings(
        api_key=api_key,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body,
        body_timeout=args.body_timeout,
        cors_origins=args.cors_origin,
        allowed_hosts=sorted({*LOOPBACK_NAMES, args.host.lower()}) if loopback else None,
        sampling=sampling,
    )
    _setup_logging(args.log_level)
    if args.preload:
        for spec in specs:
            registry.get(spec)
    app = create_app(registry, settings)
    sock = _bind(args.host, args.port)
    port = sock.getsockname()[1]
    shown = f"[{args.host}]" if ":" in args.host else args.host
    page = f"http://{_browser_host(args.host)}:{port}/"
    sys.stderr.write(
        f"pipx-llama serving {', '.join(registry.names)} at http://{shown}:{port}\n"
        f"  OpenAI API: http://{shown}:{port}/v1   Ollama API: http://{shown}:{port}/api"
        f"{'   (API key required)' if api_key else ''}\n"
        f"  Chat page: {page}\n"
    )
    sys.stderr.flush()
    limits = ConnectionLimits(header_timeout=args.header_timeout, max_connections=args.max_connections)
    config = uvicorn_config(
        app,
        limits,
        log_level=args.log_level,
        timeout_graceful_shutdown=3,
        server_header=False,
        log_config=None,
    )
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    server = uvicorn.Server(config)
    if args.open:
        threading.Thread(target=_open_when_started, args=(server, page), daemon=True).start()
    server.run(sockets=[sock])
    return 0


def _browser_host(host: str) -> str:
    """The name a browser on this machine uses for ``host`` (a wildcard address is reached on loopback)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host.strip("[]") == "::":
        return "[::1]"
    return f"[{host.strip('[]')}]" if ":" in host else host


def _open_when_started(server: uvicorn.Server, url: str) -> None:
    # opening before uvicorn's start-up would show a connection error if the start-up failed
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or server.should_exit:
            return
        time.sleep(0.05)
    if not webbrowser.open(url):
        sys.stderr.write(f"could not open a web browser; open {url} yourself\n")


def _specs(args: argparse.Namespace, spec_cls: type) -> list:
    """Every model to serve, made ready by the road (``--variant``/``--quant`` apply to those by name)."""
    from pipx_llama.models.reference import file_reference, parse_reference

    specs = []
    color = road.color_enabled(sys.stderr)
    for path in args.model_file:
        r = road.ready(args, file_reference(path), n_ctx=args.ctx_size, color=color, by_name_only=True)
        specs.append(spec_cls(r.name, r.path, aliases=(path.name,)))
    names = args.model or ([] if args.model_file else [DEFAULT_MODEL])
    for name in dict.fromkeys(names):
        ref = parse_reference(name)
        r = road.ready(args, ref, n_ctx=args.ctx_size, color=color, by_name_only=True)
        d = r.defaults
        length = d.n_predict if d.n_predict is not None and d.n_predict >= 0 else None
        specs.append(spec_cls(r.name if ref.is_file else name, r.path, sampling=sampler_config(args, d),
                              stop=d.stop, system=d.system, max_tokens=length, n_ctx=d.n_ctx,
                              template=d.template))
    return specs


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise UsageError(
            f"cannot listen on {host}: {err.strerror}", "pass an address of this machine"
        ) from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    if os.name == "posix":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(128)
    except OSError as err:
        sock.close()
        raise UsageError(
            f"cannot listen on {host}:{port}: {err.strerror}",
            "another program may use that port; pick another with --port (0 = any free port)",
        ) from None
    sock.set_inheritable(True)
    return sock
