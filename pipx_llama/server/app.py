"""The ASGI application: OpenAI- and Ollama-compatible endpoints over the engine.

``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (server-sent events when ``stream``),
``/health``, ``/props`` (the sampler defaults, in llama.cpp's shape), and Ollama's ``/api/generate``,
``/api/chat``, ``/api/tags``, ``/api/ps``, ``/api/version`` (NDJSON streams). ``/`` serves the chat page from
``static/`` and its vendored libraries from ``static/vendor/`` (no API key needed to load it; its API
calls send the key).

A request is validated, its model loaded (first use only), its prompt tokenized and its output
grammar compiled (``response_format``/``format``, a forced tool call) before it is queued, so every
client mistake -- a hostile schema too -- is a 4xx before any byte of a stream is sent. Chat answers to
requests with tools go through ``tools.ToolParser``, which turns them into ``tool_calls`` (streamed as
deltas when each call is complete). Generation runs on the
scheduler's worker thread; a client that goes away cancels its job.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from pipx_llama import __version__
from pipx_llama.engine import Constraint, GrammarError, SamplerConfig, json_schema_grammar
from pipx_llama.errors import ChatTemplateError, PipxLlamaError, TokenizerError, UsageError
from pipx_llama.server import schemas
from pipx_llama.server.errors import APIError, bad_request, from_engine, internal, quote
from pipx_llama.server.middleware import (
    AuthMiddleware,
    BodyLimitMiddleware,
    HostCheckMiddleware,
    JsonBodyMiddleware,
    OriginCheckMiddleware,
    error_response,
)
from pipx_llama.server.registry import LoadedModel, ModelRegistry, ModelSpec
from pipx_llama.server.scheduler import Done, Failed, Job, QueueFull, Scheduler, Text
from pipx_llama.server.tools import Content, ToolCall, ToolPlan, plan_chat
from pipx_llama.tokenizer.tokenizer import Tokenizer

log = logging.getLogger("pipx_llama.server")

LOCAL_ORIGINS = r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?"
TOKENIZE_THREADS = 2  # prompts rendered and tokenized at once; more wait (the engine runs one job anyway)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
STATIC = Path(__file__).with_name("static")
PAGE_FILES = {  # URL path -> (file in STATIC, media type); nothing else of STATIC is served
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}
VENDOR = STATIC / "vendor"  # the page's libraries, written by scripts/vendor-web.sh
VENDOR_MEDIA = {  # suffix -> media type; files of other kinds in VENDOR (README, SHA256SUMS) are not served
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".woff2": "font/woff2",
    ".txt": "text/plain; charset=utf-8",  # the licences
}
# the page loads only its own files and talks only to this server: model text can never pull in script
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # a new version of the package shows its new page at once
}


@dataclass
class ServerSettings:
    """Everything about serving that is not a model."""

    api_key: str | None = None
    max_queue: int = 16  # requests waiting beyond the one running; more get 503
    max_body_bytes: int = 4 << 20
    body_timeout: float | None = 60.0  # seconds from a request's headers to the end of its body; slower: 408
    cors_origins: list[str] = field(default_factory=list)  # besides localhost pages; "*" for any
    allowed_hosts: list[str] | None = None  # Host header values accepted (DNS-rebinding guard); None: any
    sampling: SamplerConfig = field(default_factory=SamplerConfig)  # defaults for fields a request leaves out


@dataclass
class _Prepared:
    job: Job
    model: LoadedModel
    prompt_text: str  # for echo
    tools: ToolPlan | None = None  # a chat with tools: how its answer is parsed


@dataclass
class _Prompt:
    ids: list[int]
    text: str
    constraint: Constraint | None = None
    tools: ToolPlan | None = None


class Server:
    """Owns the registry and the scheduler; its methods are the endpoints."""

    def __init__(self, registry: ModelRegistry, settings: ServerSettings) -> None:
        self.registry = registry
        self.settings = settings
        self.scheduler: Scheduler | None = None
        self.tokenize_limiter: anyio.CapacityLimiter | None = None  # made in the lifespan, on the event loop

    # -- plumbing -----------------------------------------------------------------------------------

    async def _json(self, request: Request) -> Any:
        body = await request.body()
        if not body.strip():
            raise bad_request("the request body is empty; send a JSON object")
        try:
            value = json.loads(body, parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError) as err:
            raise bad_request(f"the request body is not valid JSON: {err}") from None
        except RecursionError:
            raise bad_request("the request body nests arrays or objects too deeply to be a request") from None
        return _without_surrogates(value) if _MAY_HOLD_SURROGATES.search(body) else value

    async def _prepare(self, req: schemas.GenRequest, endpoint: str, prompt_param: str) -> _Prepared:
        spec = self.registry.find(req.model)
        loaded = await self._load(spec)
        if spec.system and req.messages is not None and not any(m["role"] == "system" for m in req.messages):
            req.messages = [{"role": "system", "content": spec.system}, *req.messages]
        # megabytes of text hold the GIL for seconds: few at a time, and never on the event loop
        prompt = await anyio.to_thread.run_sync(_tokenize, loaded, req, prompt_param,
                                                limiter=self.tokenize_limiter)
        ids = prompt.ids
        _check_room(loaded, len(ids), req, prompt_param)
        room = loaded.n_ctx - len(ids)
        max_tokens = req.max_tokens if req.max_tokens is not None else min(room, spec.max_tokens or room)
        job = Job(schemas.new_id("req"), endpoint, loaded, ids, max_tokens,
                  req.sampler(spec.sampling or self.settings.sampling), req.stop or spec.stop,
                  prompt.constraint, special=prompt.tools is not None and prompt.tools.parse)
        job.bind()
        try:
            self.scheduler.submit(job)
        except QueueFull as full:
            raise APIError(503, f"The server is busy: {full.waiting} requests are waiting. Retry in "
                                f"{full.retry_after} s.", type="server_error", code="server_busy",
                           headers={"Retry-After": str(full.retry_after)}) from None
        return _Prepared(job, loaded, prompt.text, prompt.tools)

    async def _load(self, spec: ModelSpec) -> LoadedModel:
        try:
            return await run_in_threadpool(self.registry.get, spec)
        except PipxLlamaError as err:
            log.error("cannot load %s: %s", spec.name, err)
            raise APIError(500, f"the model {spec.name} could not be loaded: {err.message}",
                           type="server_error", code="model_load_failed") from None

    async def _collect(self, request: Request, job: Job) -> str:
        """Wait for a job's whole text; cancel it if the client leaves first."""
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        parts = []
        try:
            async for ev in job.events():
                if isinstance(ev, Text):
                    parts.append(ev.text)
                elif isinstance(ev, Failed):
                    raise _generation_error(ev.error)
        finally:
            watcher.cancel()
            job.cancel()  # no-op when it finished; stops it when this request was itself cancelled
        return "".join(parts)

    # -- OpenAI --------------------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        req = schemas.parse_chat(await self._json(request))
        p = await self._prepare(req, "chat", "messages")
        rid, created, name = schemas.new_id("chatcmpl"), int(time.time()), p.model.spec.name
        headers = {"X-Request-Id": p.job.id}
        if req.stream:
            return StreamingResponse(self._chat_stream(p.job, rid, created, name, req.include_usage, p.tools),
                                     media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
        text = await self._collect(request, p.job)
        text, calls = _split_calls(text, p.tools)
        return JSONResponse(schemas.chat_completion(rid, created, name, text, p.job.stats, calls),
                            headers=headers)

    async def _chat_stream(self, job: Job, rid: str, created: int, name: str, include_usage: bool,
                           tools: ToolPlan | None) -> AsyncIterator[str]:
        parser = tools.parser() if tools is not None and tools.parse else None
        n_calls = 0

        def chunks(events: list[Content | ToolCall]) -> list[str]:
            nonlocal n_calls
            out = []
            for e in events:
                if isinstance(e, Content):
                    out.append(_sse(schemas.chat_chunk(rid, created, name, {"content": e.text}, None,
                                                       include_usage)))
                else:
                    out += [_sse(schemas.chat_chunk(rid, created, name, d, None, include_usage))
                            for d in schemas.tool_call_deltas(n_calls, e)]
                    n_calls += 1
            return out

        try:
            yield _sse(schemas.chat_chunk(rid, created, name,
                                          {"role": "assistant", "content": "", "refusal": None}, None,
                                          include_usage))
            async for ev in job.events():
                if isinstance(ev, Text):
                    for chunk in chunks(parser.feed(ev.text) if parser else [Content(ev.text)]):
                        yield chunk
                elif isinstance(ev, Done):
                    for chunk in chunks(parser.finish() if parser else []):
                        yield chunk
                    yield _sse(schemas.chat_chunk(rid, created, name, {},
                                                  schemas.finish_reason(ev.stats, n_calls > 0),
                                                  include_usage))
                    if include_usage:
                        yield _sse(schemas.usage_chunk(rid, created, name, "chat.completion.chunk", ev.stats))
                    yield "data: [DONE]\n\n"
                else:
                    yield _sse(_generation_error(ev.error).openai_body())
        finally:
            job.cancel()

    async def completions(self, request: Request) -> Response:
        req = schemas.parse_completion(await self._json(request))
        p = await self._prepare(req, "completion", "prompt")
        rid, created, name = schemas.new_id("cmpl"), int(time.time()), p.model.spec.name
        headers = {"X-Request-Id": p.job.id}
        prefix = p.prompt_text if req.echo else ""
        if req.stream:
            return StreamingResponse(self._completion_stream(p.job, rid, created, name, req.include_usage,
                                                             prefix),
                                     media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
        text = await self._collect(request, p.job)
        return JSONResponse(schemas.completion(rid, created, name, prefix + text, p.job.stats),
                            headers=headers)

    async def _completion_stream(self, job: Job, rid: str, created: int, name: str, include_usage: bool,
                                 prefix: str) -> AsyncIterator[str]:
        try:
            if prefix:
                yield _sse(schemas.completion_chunk(rid, created, name, prefix, None, include_usage))
            async for ev in job.events():
                if isinstance(ev, Text):
                    yield _sse(schemas.completion_chunk(rid, created, name, ev.text, None, include_usage))
                elif isinstance(ev, Done):
                    yield _sse(schemas.completion_chunk(rid, created, name, "",
                                                        schemas.finish_reason(ev.stats), include_usage))
                    if include_usage:
                        yield _sse(schemas.usage_chunk(rid, created, name, "text_completion", ev.stats))
                    yield "data: [DONE]\n\n"
                else:
                    yield _sse(_generation_error(ev.error).openai_body())
        finally:
            job.cancel()

    async def models(self, request: Request) -> Response:
        data = [schemas.model_object(s.name, int(self.registry.summary(s)["mtime"]))
                for s in self.registry.specs()]
        return JSONResponse({"object": "list", "data": data})

    async def model(self, request: Request) -> Response:
        spec = self.registry.find(request.path_params["model"])
        return JSONResponse(schemas.model_object(spec.name, int(self.registry.summary(spec)["mtime"])))

    # -- Ollama --------------------------------------------------------------------------------------

    async def ollama_generate(self, request: Request) -> Response:
        return await self._ollama(request, schemas.parse_ollama_generate(await self._json(request)),
                                  "generate")

    async def ollama_chat(self, request: Request) -> Response:
        return await self._ollama(request, schemas.parse_ollama_chat(await self._json(request)), "chat")

    async def _ollama(self, request: Request, req: schemas.GenRequest, kind: str) -> Response:
        t0 = time.perf_counter()
        if req.messages is None and not req.prompt:
            # Ollama's way to load a model without generating
            spec = self.registry.find(req.model)
            await self._load(spec)
            out: dict[str, Any] = {"model": spec.name, "created_at": schemas.ollama_time(), "done": True,
                                   "done_reason": "load"}
            out.update({"response": ""} if kind == "generate" else
                       {"message": {"role": "assistant", "content": ""}})
            return JSONResponse(out)
        was_loaded = self.registry.is_loaded(self.registry.find(req.model).name)
        p = await self._prepare(req, f"api/{kind}", "prompt" if kind == "generate" else "messages")
        load_seconds = 0.0 if was_loaded else p.model.load_seconds
        name = p.model.spec.name
        headers = {"X-Request-Id": p.job.id}

        def piece(text: str, calls: list[ToolCall] | None = None) -> dict[str, Any]:
            body: dict[str, Any] = {"model": name, "created_at": schemas.ollama_time()}
            if kind == "generate":
                body["response"] = text
            else:
                body["message"] = {"role": "assistant", "content": text}
                if calls:
                    body["message"]["tool_calls"] = schemas.ollama_tool_calls(calls)
            body["done"] = False
            return body

        def final(job: Job, text: str, calls: list[ToolCall] | None = None) -> dict[str, Any]:
            body = piece(text, calls)
            body.update(schemas.ollama_final(job.stats, time.perf_counter() - t0, load_seconds))
            if kind == "generate":
                body["context"] = job.prompt + job.tokens
            return body

        if not req.stream:
            text = await self._collect(request, p.job)
            text, calls = _split_calls(text, p.tools)
            return JSONResponse(final(p.job, text, calls), headers=headers)

        parser = p.tools.parser() if p.tools is not None and p.tools.parse else None

        def pieces(events: list[Content | ToolCall]) -> list[str]:
            text = "".join(e.text for e in events if isinstance(e, Content))
            calls = [e for e in events if isinstance(e, ToolCall)]
            return [_ndjson(piece(text, calls))] if text or calls else []

        async def lines() -> AsyncIterator[str]:
            try:
                async for ev in p.job.events():
                    if isinstance(ev, Text):
                        for line in pieces(parser.feed(ev.text)) if parser else [_ndjson(piece(ev.text))]:
                            yield line
                    elif isinstance(ev, Done):
                        for line in pieces(parser.finish()) if parser else []:
                            yield line
                        yield _ndjson(final(p.job, ""))
                    else:
                        yield _ndjson(_generation_error(ev.error).ollama_body())
            finally:
                p.job.cancel()

        return StreamingResponse(lines(), media_type="application/x-ndjson", headers=headers)

    async def ollama_tags(self, request: Request) -> Response:
        models = []
        for spec in self.registry.specs():
            s = self.registry.summary(spec)
            models.append({
                "name": spec.name,
                "model": spec.name,
                "modified_at": schemas.ollama_time(s["mtime"]),
                "size": s["size"],
                "digest": spec.digest or "",
                "details": {"parent_model": "", "format": "gguf", "family": s["family"],
                            "families": [s["family"]] if s["family"] else None,
                            "parameter_size": s["parameter_size"],
                            "quantization_level": s["quantization_level"]},
            })
        return JSONResponse({"models": models})

    async def ollama_ps(self, request: Request) -> Response:
        """Ollama's running-models list: what is loaded, its memory (weights mapped plus KV cache), since
        when. Models stay loaded until the server stops, so ``expires_at`` is empty."""
        models = []
        for lm in self.registry.loaded():
            s = self.registry.summary(lm.spec)
            kv = lm.context.kv_bytes
            models.append({
                "name": lm.spec.name,
                "model": lm.spec.name,
                "size": s["size"] + kv,
                "size_vram": 0,
                "digest": lm.spec.digest or "",
                "details": {"parent_model": "", "format": "gguf", "family": s["family"],
                            "families": [s["family"]] if s["family"] else None,
                            "parameter_size": s["parameter_size"],
                            "quantization_level": s["quantization_level"]},
                "expires_at": "",
                "loaded_at": schemas.ollama_time(lm.loaded_at),
                "context_length": lm.n_ctx,
                "kv_cache_bytes": kv,
                "load_seconds": round(lm.load_seconds, 3),
            })
        return JSONResponse({"models": models})

    async def ollama_version(self, request: Request) -> Response:
        return JSONResponse({"version": __version__})

    # -- health and defaults ---------------------------------------------------------------------------

    async def props(self, request: Request) -> Response:
        """The values a request gets for the sampler fields it leaves out (the chat page shows them)."""
        params: dict[str, Any] = dataclasses.asdict(self.settings.sampling)
        params["logit_bias"] = {str(i): b for i, b in self.settings.sampling.logit_bias}  # OpenAI's shape
        params["max_tokens"] = None  # until the model stops or the context is full
        return JSONResponse({"default_generation_settings": {"params": params},
                             "build_info": f"pipx-llama {__version__}"})

    async def health(self, request: Request) -> Response:
        sch = self.scheduler
        return JSONResponse({
            "status": "ok",
            "models": [{"id": n, "loaded": self.registry.is_loaded(n)} for n in self.registry.names],
            "queue": {"running": sch.running, "waiting": sch.waiting, "max_waiting": sch.max_queue},
            "requests": dict(sch.counts),
        })


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# "\ud800" escapes, or surrogates encoded in the UTF-8 bytes (json.loads decodes with surrogatepass)
_MAY_HOLD_SURROGATES = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _without_surrogates(value: Any) -> Any:
    """``value`` with each lone surrogate made U+FFFD, in place (iteratively: values nest ~1000 deep).

    JSON may escape a lone surrogate, but such a string cannot be written as UTF-8: echoed in an answer
    (a model name, an echoed prompt) it would fail the response. The tokenizer reads them as U+FFFD too.
    """
    def fix(text: str) -> str:
        return _SURROGATE.sub("\ufffd", text)

    if isinstance(value, str):
        return fix(value)
    stack = [value]
    while stack:
        node = stack.pop()
        items = list(enumerate(node)) if isinstance(node, list) \
            else list(node.items()) if isinstance(node, dict) else []
        for key, item in items:
            if isinstance(item, str):
                item = fix(item)
            elif isinstance(item, (list, dict)):
                stack.append(item)
            if isinstance(key, str) and _SURROGATE.search(key):
                del node[key]
                key = fix(key)
            node[key] = item
    return value


def _check_ids(loaded: LoadedModel, ids: list[int], param: str) -> None:
    n_vocab = loaded.model.hparams.n_vocab
    bad = next((t for t in ids if not 0 <= t < n_vocab), None)
    if bad is not None:
        raise bad_request(f"token id {quote(bad)} in '{param}' is outside the vocabulary (0..{n_vocab - 1})",
                          param)


def _check_room(loaded: LoadedModel, n_prompt: int, req: schemas.GenRequest, prompt_param: str,
                *, at_least: bool = False) -> None:
    """400 when ``n_prompt`` tokens (or, ``at_least``, that many or more) leave no room to generate."""
    n_ctx = loaded.n_ctx
    if n_prompt >= n_ctx or (req.max_tokens is not None and n_prompt + req.max_tokens > n_ctx):
        raise schemas.context_error(n_prompt, req.max_tokens, n_ctx, prompt_param, at_least=at_least)


def _tokenize(loaded: LoadedModel, req: schemas.GenRequest, prompt_param: str) -> _Prompt:
    """The prompt's token ids and text, and the answer's grammar; refuses, before encoding it, text too
    long for the context."""
    tok = loaded.model.tokenizer
    plan = None
    try:
        if isinstance(req.prompt, list):
            _check_room(loaded, len(req.prompt), req, prompt_param)
            _check_ids(loaded, req.prompt, prompt_param)
            ids, text = list(req.prompt), tok.decode(req.prompt)
        else:
            if req.messages is not None and (req.tools or any(m["role"] == "tool" or "tool_calls" in m
                                                              for m in req.messages)):
                plan = plan_chat(tok, req.messages, req.tools, req.tool_choice, req.parallel_tool_calls)
                text = tok.chat_prompt(plan.messages, tools=plan.tools)
            elif req.messages is not None:
                text = tok.chat_prompt(req.messages, add_generation_prompt=True)
            else:
                text = req.prompt
            _check_room(loaded, len(req.context) + loaded.pieces.min_tokens(text), req, prompt_param,
                        at_least=True)
            _check_ids(loaded, req.context, "context")
            ids = req.context + tok.encode(text, add_special=req.messages is not None or not req.context)
        if not ids:
            raise bad_request("the prompt is empty", prompt_param)
        _check_ids(loaded, [i for i, _ in req.sampling.get("logit_bias", ())], "logit_bias")
        return _Prompt(ids, text, _constraint(tok, req, plan), plan)
    except GrammarError as err:
        raise bad_request(err.message, err.param) from None
    except (ChatTemplateError, TokenizerError, UsageError) as err:
        raise from_engine(err, prompt_param) from None


def _constraint(tok: Tokenizer, req: schemas.GenRequest, plan: ToolPlan | None) -> Constraint | None:
    """The grammar the answer follows: a forced tool call, else the requested JSON schema, else none."""
    if plan is not None and plan.grammar is not None:
        return Constraint(plan.grammar, tok, param="tools")
    if req.response_schema is not None:
        param = req.response_param or "response_format"
        return Constraint(json_schema_grammar(req.response_schema, param=param), tok, param=param)
    return None


def _split_calls(text: str, tools: ToolPlan | None) -> tuple[str, list[ToolCall]]:
    """A whole answer's text and tool calls."""
    if tools is None or not tools.parse:
        return text, []
    parser = tools.parser()
    events = parser.feed(text) + parser.finish()
    return ("".join(e.text for e in events if isinstance(e, Content)),
            [e for e in events if isinstance(e, ToolCall)])


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


def _generation_error(err: BaseException) -> APIError:
    if isinstance(err, GrammarError):  # a schema whose later steps exceed the grammar limits
        return bad_request(err.message, err.param)
    if isinstance(err, PipxLlamaError):
        return APIError(500, f"generation failed: {err.message}", type="server_error",
                        code="generation_failed")
    return internal(f"generation failed: {type(err).__name__}: {err}")


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _ndjson(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"


def _page_file(name: str, media_type: str) -> Callable[[Request], Awaitable[Response]]:
    async def serve(request: Request) -> Response:
        return FileResponse(STATIC / name, media_type=media_type, headers=PAGE_HEADERS)
    return serve


def vendor_files(root: Path = VENDOR) -> dict[str, tuple[Path, str]]:
    """Path under ``/vendor/`` -> (file, media type) for each servable file under ``root``, listed once.

    Only names found by walking the folder can ever be served, so no request path is joined onto a
    file system path; a file whose real location is outside the folder (a symbolic link) is left out.
    """
    real_root = root.resolve()
    files = {}
    for path in sorted(root.rglob("*")):
        media = VENDOR_MEDIA.get(path.suffix)
        if media and path.is_file() and path.resolve().is_relative_to(real_root):
            files[path.relative_to(root).as_posix()] = (path, media)
    return files


def _vendor_route(files: dict[str, tuple[Path, str]]) -> Callable[[Request], Awaitable[Response]]:
    async def serve(request: Request) -> Response:
        found = files.get(request.path_params["path"])
        if found is None:
            raise HTTPException(404)
        return FileResponse(found[0], media_type=found[1], headers=PAGE_HEADERS)
    return serve


def create_app(registry: ModelRegistry, settings: ServerSettings | None = None) -> Starlette:
    """The ASGI app; its scheduler starts with the app's lifespan and stops (cancelling all) with it."""
    settings = settings or ServerSettings()
    server = Server(registry, settings)

    def route(path: str, fn: Callable[[Request], Awaitable[Response]], method: str) -> Route:
        return Route(path, fn, methods=[method])

    routes = [
        route("/health", server.health, "GET"),
        route("/props", server.props, "GET"),
        route("/v1/models", server.models, "GET"),
        route("/v1/models/{model:path}", server.model, "GET"),
        route("/v1/chat/completions", server.chat_completions, "POST"),
        route("/v1/completions", server.completions, "POST"),
        route("/api/generate", server.ollama_generate, "POST"),
        route("/api/chat", server.ollama_chat, "POST"),
        route("/api/tags", server.ollama_tags, "GET"),
        route("/api/ps", server.ollama_ps, "GET"),
        route("/api/version", server.ollama_version, "GET"),
        *(route(path, _page_file(name, media), "GET") for path, (name, media) in PAGE_FILES.items()),
        route("/vendor/{path:path}", _vendor_route(vendor_files()), "GET"),
    ]
    middleware = []
    if settings.allowed_hosts is not None:
        middleware.append(Middleware(HostCheckMiddleware, allowed=settings.allowed_hosts))
    origins = list(settings.cors_origins)
    middleware += [
        Middleware(CORSMiddleware, allow_origins=origins,
                   allow_origin_regex=None if "*" in origins else LOCAL_ORIGINS,
                   allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["Authorization", "Content-Type"],
                   expose_headers=["Retry-After", "X-Request-Id"], max_age=600),
        Middleware(OriginCheckMiddleware, origins=origins, origin_regex=LOCAL_ORIGINS),
        Middleware(AuthMiddleware, api_key=settings.api_key),
        Middleware(BodyLimitMiddleware, limit=settings.max_body_bytes, timeout=settings.body_timeout),
        Middleware(JsonBodyMiddleware),
    ]

    async def on_api_error(request: Request, exc: APIError) -> Response:
        return error_response(request.scope, exc)

    async def on_http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            err = APIError(404, f"Invalid URL ({request.method} {request.url.path})")
        elif exc.status_code == 405:
            err = APIError(405, f"{request.method} is not allowed on {request.url.path}")
        else:
            err = APIError(exc.status_code, str(exc.detail))
        return error_response(request.scope, err)

    async def on_client_gone(request: Request, exc: ClientDisconnect) -> Response:
        # not an error of the server: one line, no traceback (the answer goes nowhere)
        log.info("%s %s: the client closed the connection before its request body was complete",
                 request.method, request.url.path)
        return Response(status_code=400)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(request.scope, internal(f"internal error: {type(exc).__name__}"))

    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        server.scheduler = Scheduler(settings.max_queue)
        server.tokenize_limiter = anyio.CapacityLimiter(TOKENIZE_THREADS)
        try:
            yield
        finally:
            await run_in_threadpool(server.scheduler.close)

    app = Starlette(routes=routes, middleware=middleware, lifespan=contextlib.asynccontextmanager(lifespan),
                    exception_handlers={APIError: on_api_error, HTTPException: on_http_error,
                                        ClientDisconnect: on_client_gone, Exception: on_unexpected})
    app.state.server = server
    return app
