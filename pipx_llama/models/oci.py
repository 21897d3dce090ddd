"""Models in OCI registries, in ollama's layout: the distribution API's client side (manifests, blobs,
token and basic auth, uploads) and the resolver from an ``oci`` reference to a ``Manifest``.

Labs already run container registries (Harbor, Artifactory, GitLab, ghcr, a plain ``distribution``),
with the caching, auth and replication they trust; ollama stores its models in them as an image
manifest whose layers carry ``application/vnd.ollama.image.*`` media types. A reference resolves to a
manifest of our own, generated from the registry's (pinned by its digest), with one ``oci`` source per
file: the blobs come through the same resumable downloader, locks, sha256 checks and store as every
other file, since a blob's digest *is* its sha256.

Every answer of a registry is hostile input: sizes are bounded, shapes checked, digests recomputed,
and each refusal is one line naming the registry, the repository and the digest.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from pipx_llama import __version__
from pipx_llama.errors import FetchError, ModelFileError, UsageError
from pipx_llama.fetch.errors import AccessDenied, OfflineError, SourceNotFound
from pipx_llama.files import atomic_write_bytes
from pipx_llama.models.defaults import from_ollama
from pipx_llama.models.manifest import (
    Manifest,
    ManifestError,
    is_loopback_host,
    parse_manifest,
    render_manifest,
)
from pipx_llama.models.reference import DEFAULT_TAG, OciName, Reference

MANIFEST_TYPES = (
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
)
OLLAMA_MODEL = "application/vnd.ollama.image.model"
OLLAMA_CONFIG = "application/vnd.docker.container.image.v1+json"
# Layers we read (small text) or may skip; and those that change what the model is, which we cannot run.
OLLAMA_TEXT = {
    "application/vnd.ollama.image.template": "template",
    "application/vnd.ollama.image.system": "system",
    "application/vnd.ollama.image.params": "params",
    "application/vnd.ollama.image.license": "license",
    "application/vnd.ollama.image.messages": "messages",
}
OLLAMA_REFUSED = {
    "application/vnd.ollama.image.projector": "a vision projector (multimodal model)",
    "application/vnd.ollama.image.adapter": "a LoRA adapter",
    "application/vnd.ollama.image.tensor": "raw tensors (a safetensors import, not a GGUF)",
}
MAX_MANIFEST = 4 << 20       # the distribution server's own limit is 4 MiB
MAX_SMALL_BLOB = 1 << 20     # config, template, params, license
MAX_TOKEN = 64 << 10
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_AUTH_PARAM = re.compile(r'(\w+)="([^"]*)"')
_TIMEOUT = httpx.Timeout(30.0)


class RegistryError(FetchError):
    """A registry refused a request or answered something we cannot use; says which and what to do."""


@dataclass(frozen=True)
class Layer:
    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return self.digest.removeprefix("sha256:")


@dataclass(frozen=True)
class ImageManifest:
    """A registry manifest, checked: its digest (sha256 of the bytes served), config and layers."""

    digest: str
    media_type: str
    config: Layer
    layers: tuple[Layer, ...]
    raw: bytes


def registry_base(registry: str, *, allow_http: bool) -> str:
    """The registry's API root: https, or http for a loopback registry (or when plain http is allowed)."""
    host = urlsplit(f"//{registry}").hostname or ""
    scheme = "http" if is_loopback_host(host) or allow_http else "https"
    return f"{scheme}://{registry}"


def docker_credentials(registry: str, env: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """``user, password`` for ``registry`` from the standard Docker ``config.json`` (``$DOCKER_CONFIG`` or
    ``~/.docker``), as ``docker login`` writes it; None when it holds none (credential helpers are not
    run)."""
    env = os.environ if env is None else env
    folder = Path(env["DOCKER_CONFIG"]) if env.get("DOCKER_CONFIG") else Path.home() / ".docker"
    path = folder / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UsageError(f"cannot read Docker's credentials {path}: {err}",
                         "fix or remove the file") from None
    auths = data.get("auths") if isinstance(data, dict) else None
    if not isinstance(auths, dict):
        return None
    for key in (registry, f"https://{registry}", f"http://{registry}", f"https://{registry}/v2/"):
        entry = auths.get(key)
        if isinstance(entry, dict):
            return _entry_credentials(entry, path, registry)
    return None


def _entry_credentials(entry: Mapping[str, Any], path: Path, registry: str) -> tuple[str, str] | None:
    if isinstance(entry.get("auth"), str) and entry["auth"]:
        try:
            user, sep, password = base64.b64decode(entry["auth"], validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            sep = ""
        if not sep:
            raise UsageError(f"{path}: the auth of {registry} is not base64 of user:password",
                             f"run `docker login {registry}` again, or fix the file")
        return user, password
    if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
        return entry["username"], entry["password"]
    return None


def credentials_for(registry: str, configured: Mapping[str, str]) -> tuple[str, str] | None:
    """The configured ``user:password`` for ``registry`` (pipx-llama's config first), else Docker's."""
    value = configured.get(registry)
    if value is not None:
        user, sep, password = value.partition(":")
        if not sep:
            raise UsageError(f"registry_credentials for {registry} is not user:password",
                             "fix registry_credentials in the config file")
        return user, password
    return docker_credentials(registry)


class RegistryClient:
    """One registry's API: requests with the auth it asks for (anonymous or basic-auth bearer tokens from
    its token service, or basic auth), remembered per scope."""

    def __init__(self, registry: str, *, credentials: tuple[str, str] | None = None, allow_http: bool = False,
                 offline: bool = False) -> None:
        if offline:
            raise OfflineError(f"the registry {registry} would have to be asked and offline mode is on",
                               "run again without --offline, or use a model already in the store")
        self.registry = registry
        self.base = registry_base(registry, allow_http=allow_http)
        self.credentials = credentials
        self.allow_http = allow_http
        self._auth: dict[str, str] = {}
        self.client = httpx.Client(timeout=_TIMEOUT, follow_redirects=True, trust_env=True,
                                   headers={"User-Agent": f"pipx-llama/{__version__}"})

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> RegistryClient:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def authorization(self, scope: str) -> str | None:
        """The Authorization header value for ``scope`` (None: anonymous), asking for a token only if the
        registry wants one: a ``GET /v2/`` tells which auth it takes."""
        if scope not in self._auth:
            try:
                resp = self.client.get(f"{self.base}/v2/")
            except httpx.HTTPError as err:
                raise RegistryError(f"cannot reach the registry {self.registry}: {err}",
                                    "check the registry's address and that it is running") from None
            if resp.status_code == 401:
                self._auth[scope] = self._answer(resp, scope)
            else:
                self._auth[scope] = ""
        return self._auth[scope] or None

    def request(self, method: str, path: str, *, scope: str, headers: Mapping[str, str] | None = None,
                content: bytes | Callable[[], Iterator[bytes]] | None = None,
                what: str = "") -> httpx.Response:
        """``method`` on ``path`` (absolute URL or one under the registry), authenticating once on a 401.
        ``content`` is bytes, or a function giving the body afresh (a file streamed, sent again after
        a 401)."""
        url = path if path.startswith(("http://", "https://")) else self.base + path
        if urlsplit(url).netloc != urlsplit(self.base).netloc:
            raise RegistryError(f"the registry {self.registry} sent us to another host ({url[:100]})",
                                "pipx-llama sends credentials only to the registry itself")
        hdrs = dict(headers or {})
        for attempt in (0, 1):
            auth = self._auth.get(scope)
            if auth:
                hdrs["Authorization"] = auth
            body = content() if callable(content) else content
            try:
                resp = self.client.request(method, url, headers=hdrs, content=body)
            except httpx.HTTPError as err:
                raise RegistryError(f"cannot reach the registry {self.registry}: {err}",
                                    "check the registry's address and that it is running") from None
            if resp.status_code == 401 and attempt == 0:
                self._auth[scope] = self._answer(resp, scope)
                continue
            if resp.status_code in (401, 403):
                raise self.denied(resp.status_code, what or path)
            return resp
        raise AssertionError("unreachable")  # pragma: no cover

    def denied(self, code: int, what: str) -> AccessDenied:
        sent = "credentials were sent" if self.credentials else "no credentials were found"
        return AccessDenied(f"the registry {self.registry} denied access to {what} (HTTP {code}; {sent})",
                            f"log in with `docker login {self.registry}` or set registry_credentials in the "
                            "pipx-llama config, with an account allowed to read (or push) there")

    def _answer(self, resp: httpx.Response, scope: str) -> str:
        """The Authorization for a 401's ``WWW-Authenticate`` challenge: Bearer (token service) or Basic."""
        challenge = resp.headers.get("www-authenticate", "")
        scheme, _, params = challenge.strip().partition(" ")
        if scheme.lower() == "basic":
            if not self.credentials:
                raise self.denied(401, "its API")
            raw = f"{self.credentials[0]}:{self.credentials[1]}".encode()
            return "Basic " + base64.b64encode(raw).decode()
        if scheme.lower() != "bearer":
            raise RegistryError(f"the registry {self.registry} asks for {scheme[:40]!r} auth, which "
                                "pipx-llama does not speak", "use a registry with token or basic auth")
        values = dict(_AUTH_PARAM.findall(params))
        realm = values.get("realm", "")
        parts = urlsplit(realm)
        loop = is_loopback_host(parts.hostname or "")
        plain_ok = loop or self.allow_http
        if parts.scheme not in ("https", "http") or (parts.scheme == "http" and not plain_ok):
            raise RegistryError(f"the registry {self.registry} names an unusable token service "
                                f"{realm[:100]!r}", "the token service must be https (plain http only on "
                                "loopback)")
        query = {"scope": scope} if scope else {}
        if values.get("service"):
            query["service"] = values["service"]
        auth = httpx.BasicAuth(*self.credentials) if self.credentials else None
        try:
            answer = self.client.get(realm, params=query, auth=auth)
        except httpx.HTTPError as err:
            raise RegistryError(f"cannot reach the token service of {self.registry}: {err}",
                                "check the network, or ask whoever runs the registry") from None
        if answer.status_code in (401, 403):
            raise self.denied(answer.status_code, f"a token for {scope}")
        token = _token(answer, self.registry)
        return f"Bearer {token}"


def _token(resp: httpx.Response, registry: str) -> str:
    bad = RegistryError(f"the token service of {registry} answered HTTP {resp.status_code} without a token",
                        "ask whoever runs the registry")
    if resp.status_code != 200 or len(resp.content) > MAX_TOKEN:
        raise bad
    try:
        data = resp.json()
    except ValueError:
        raise bad from None
    token = data.get("token") or data.get("access_token") if isinstance(data, dict) else None
    if not isinstance(token, str) or not token or any(c in token for c in "\r\n"):
        raise bad
    return token


def pull_scope(repository: str) -> str:
    return f"repository:{repository}:pull"


def fetch_image_manifest(client: RegistryClient, repository: str, reference: str) -> ImageManifest:
    """GET the manifest of ``repository`` at ``reference`` (tag or digest); its digest recomputed and
    checked against a pinned reference and against ``Docker-Content-Digest``."""
    shown = f"{client.registry}/{repository}:{reference}" if not reference.startswith("sha256:") \
        else f"{client.registry}/{repository}@{reference}"
    resp = client.request("GET", f"/v2/{repository}/manifests/{reference}", scope=pull_scope(repository),
                          headers={"Accept": ", ".join(MANIFEST_TYPES)}, what=shown)
    if resp.status_code == 404:
        raise SourceNotFound(f"{shown} is not in the registry (HTTP 404)",
                             "check the name and tag (e.g. with `skopeo list-tags`)")
    if resp.status_code != 200:
        raise RegistryError(f"the registry answered HTTP {resp.status_code} for the manifest of {shown}",
                            "try again later, or ask whoever runs the registry")
    raw = resp.content
    if len(raw) > MAX_MANIFEST:
        raise RegistryError(f"the manifest of {shown} is over {MAX_MANIFEST >> 20} MiB; refused",
                            "this is not a model manifest")
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    if reference.startswith("sha256:") and digest != reference:
        raise RegistryError(f"the registry served a manifest with digest {digest} for {shown}; refused",
                            "the registry does not hold what the digest pins; do not use it")
    header = resp.headers.get("docker-content-digest")
    if header and header != digest:
        raise RegistryError(f"the manifest of {shown} hashes to {digest}, not to the {header} the registry "
                            "announced; refused", "the registry or a proxy altered it; ask whoever runs it")
    return parse_image_manifest(raw, digest, shown)


def parse_image_manifest(raw: bytes, digest: str, shown: str) -> ImageManifest:
    """The checked shape of a manifest: schemaVersion 2, a config, layers with sha256 digests and sizes."""
    def bad(problem: str) -> RegistryError:
        return RegistryError(f"the manifest of {shown} is not usable: {problem}",
                             "it is not an image manifest of a model (ollama's layout or an OCI artifact)")
    try:
        data = json.loads(raw)
    except ValueError:
        raise bad("not JSON") from None
    if not isinstance(data, dict) or data.get("schemaVersion") != 2:
        raise bad("schemaVersion is not 2")
    media = data.get("mediaType", MANIFEST_TYPES[1])
    if media not in MANIFEST_TYPES:
        raise bad(f"media type {str(media)[:80]!r} (an index of platforms or an old schema)")
    layers = data.get("layers")
    if not isinstance(layers, list) or not layers or len(layers) > 64:
        raise bad("no layers, or more than 64")
    return ImageManifest(digest, media, _layer(data.get("config"), "config", bad),
                         tuple(_layer(x, f"layer {i}", bad) for i, x in enumerate(layers)), raw)


def _layer(value: Any, where: str, bad: Any) -> Layer:
    if not isinstance(value, dict):
        raise bad(f"{where} is not an object")
    media, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
    if not isinstance(media, str) or len(media) > 255:
        raise bad(f"{where} has no media type")
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise bad(f"{where} digest {str(digest)[:80]!r} is not sha256:HEX")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 1 << 50:
        raise bad(f"{where} size {str(size)[:40]!r} is not a byte count")
    ann = value.get("annotations") or {}
    if not isinstance(ann, dict):
        raise bad(f"{where} annotations are not an object")
    return Layer(media, digest, size, {str(k): str(v) for k, v in ann.items()})


def fetch_small_blob(client: RegistryClient, repository: str, layer: Layer) -> bytes:
    """A small blob (config, template, params), its digest checked; over ``MAX_SMALL_BLOB`` refused."""
    if layer.size > MAX_SMALL_BLOB:
        raise RegistryError(f"the {layer.media_type} blob {layer.digest} in {client.registry}/{repository} "
                            f"is {layer.size} bytes; refused", "a config or text layer is at most 1 MiB")
    resp = client.request("GET", f"/v2/{repository}/blobs/{layer.digest}", scope=pull_scope(repository),
                          what=f"{client.registry}/{repository} blob {layer.digest}")
    if resp.status_code != 200:
        raise RegistryError(f"the registry answered HTTP {resp.status_code} for blob {layer.digest} of "
                            f"{client.registry}/{repository}", "the manifest names a blob the registry lacks")
    data = resp.content
    actual = "sha256:" + hashlib.sha256(data).hexdigest()
    if actual != layer.digest or len(data) != layer.size:
        raise RegistryError(f"blob {layer.digest} of {client.registry}/{repository} hashes to {actual} "
                            f"({len(data)} bytes); refused", "the registry serves damaged or altered data")
    return data


@dataclass(frozen=True)
class OllamaModel:
    """What an image manifest holds for us: the GGUF layer, the config's facts, and the text layers."""

    model: Layer
    config: Mapping[str, Any]
    texts: Mapping[str, str]   # template, system, params, license -> their text


def read_model(client: RegistryClient, repository: str, image: ImageManifest, shown: str) -> OllamaModel:
    """The model layer of ``image`` (ollama's, or an OCI artifact's ``*.gguf`` layer); refuses layers that
    change what the model is (projector, adapter) by name, and more than one model layer."""
    models: list[Layer] = []
    texts: dict[str, str] = {}
    for layer in image.layers:
        if layer.media_type in OLLAMA_REFUSED:
            raise UsageError(f"{shown} has {OLLAMA_REFUSED[layer.media_type]} ({layer.media_type}), which "
                             "pipx-llama cannot run", "pick a text-only model or tag")
        if layer.media_type in OLLAMA_TEXT:
            texts[OLLAMA_TEXT[layer.media_type]] = _text(fetch_small_blob(client, repository, layer), layer)
        elif layer.media_type == OLLAMA_MODEL or _is_gguf_artifact(layer):
            models.append(layer)
    if len(models) != 1:
        raise UsageError(f"{shown} has {len(models)} model (GGUF) layers; pipx-llama runs one",
                         "push a single GGUF, in ollama's layout (media type " + OLLAMA_MODEL + ")")
    config: dict[str, Any] = {}
    if image.config.media_type == OLLAMA_CONFIG or image.config.media_type.endswith("+json"):
        try:
            loaded = json.loads(fetch_small_blob(client, repository, image.config) or b"{}")
        except ValueError:
            raise RegistryError(f"the config blob of {shown} is not JSON",
                                "it is not a model image") from None
        config = loaded if isinstance(loaded, dict) else {}
    return OllamaModel(models[0], config, texts)


def _is_gguf_artifact(layer: Layer) -> bool:
    title = layer.annotations.get("org.opencontainers.image.title", "")
    return title.lower().endswith(".gguf") or "gguf" in layer.media_type.lower()


def _text(data: bytes, layer: Layer) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise RegistryError(f"the {layer.media_type} layer {layer.digest} is not UTF-8 text",
                            "it is not an ollama text layer") from None


_SIZE = re.compile(r"(?i)^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMBT])\s*$")
_SCALE = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}
_NAME_BAD = re.compile(r"[^a-z0-9._-]+")


def _parameters(config: Mapping[str, Any], model: Layer) -> int:
    """The weight count: the config's ``parameters``, ollama's ``model_type`` (``135M``, ``7B``), else a
    guess from the file size at ~5 bits a weight (used only for the plan's disk and RAM figures)."""
    value = config.get("parameters")
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    m = _SIZE.match(str(config.get("model_type", "")))
    if m:
        return max(1, int(float(m.group(1)) * _SCALE[m.group(2).upper()]))
    return max(1, model.size * 8 // 5)


def model_name(oci: OciName) -> str:
    """The store's name for an OCI model: its repository path (without ollama's ``library/``) and tag
    (or short digest), e.g. ``qwen2.5-0.5b`` or ``lab-smollm2-135m``."""
    path = oci.repository.removeprefix("library/").replace("/", "-")
    tail = oci.tag or (oci.digest[7:19] if oci.digest else DEFAULT_TAG)
    name = _NAME_BAD.sub("-", f"{path}-{tail}".lower()).strip("-._")
    return name[:64].rstrip("-._") or "oci-model"


def manifest_for(oci: OciName, registry: str, base: str, image: ImageManifest,
                 model: OllamaModel) -> Manifest:
    """Our manifest for an image: one GGUF variant whose one file is the model blob, fetched from the
    registry by digest; the image's digest is in the text (the store keeps it with the files: the lock)."""
    cfg = model.config
    quant = str(cfg.get("file_type") or "") or None
    ctx = cfg.get("context_length")
    name = model_name(oci)
    where = f"{registry}/{oci.repository}"
    try:
        texts = model.texts
        defaults = from_ollama(texts.get("params"), texts.get("system"), texts.get("template"),
                               where=f"{where}@{image.digest}")
    except ModelFileError as err:
        raise RegistryError(err.message, "the image's params, system or template layer cannot be used; "
                            "fix it where the model is published, or pick another tag") from None
    data = {
        "format": 1,
        "name": name,
        "description": f"{where}:{oci.tag or DEFAULT_TAG} (OCI image {image.digest})"
        if not oci.digest else f"{where}@{image.digest}",
        "license": (model.texts.get("license", "").strip().splitlines() or ["see the registry"])[0][:200],
        "homepage": None,
        "architecture": str(cfg.get("model_family") or "unknown")[:64],
        "parameters": _parameters(cfg, model.model),
        "context_length": ctx if isinstance(ctx, int) and not isinstance(ctx, bool) and ctx > 0 else 4096,
        "defaults": defaults.table() or None,
        "variants": [{
            "name": (quant or "gguf").lower()[:64] if quant and re.fullmatch(r"[A-Za-z0-9_.-]+", quant)
            else "gguf",
            "format": "gguf",
            "quantization": quant if quant and re.fullmatch(r"[A-Za-z0-9_]+", quant) else None,
            "description": f"OCI image {image.digest}",
            "files": [{"path": f"{name}.gguf", "size": model.model.size, "sha256": model.model.sha256}],
            "sources": [{"type": "oci", "url": f"{base}/v2/{oci.repository}"}],
        }],
    }
    text = f"# generated by pipx-llama from {where} (OCI image {image.digest})\n" + render_manifest(data)
    try:
        return parse_manifest(text, f"{where} (OCI image {image.digest})", allow_http=True)
    except ManifestError as err:
        raise RegistryError(f"{where}: the image does not make a usable manifest: {err.problems[0]}",
                            "the image's config holds values pipx-llama cannot use") from None


def resolve_oci(ref: Reference, options: Any) -> Manifest:
    """The manifest for an ``oci`` reference: the registry's manifest fetched (by tag, or pinned by
    digest), its model layer found, its small layers and config read and checked."""
    if ref.oci is None:
        raise UsageError(f"{ref.text} is not an OCI reference", "write [REGISTRY/]NAMESPACE/NAME[:TAG]")
    oci = ref.oci
    registry = oci.registry or options.registry
    lock = lock_path(options.lock_dir, registry, oci)
    if options.offline and lock is not None and lock.is_file():
        return parse_manifest(lock.read_text(encoding="utf-8"),
                              f"{lock} (resolved {registry}/{oci.repository})", allow_http=True)
    creds = credentials_for(registry, options.registry_credentials)
    with RegistryClient(registry, credentials=creds, allow_http=options.allow_http,
                        offline=options.offline) as client:
        image = fetch_image_manifest(client, oci.repository, oci.reference)
        shown = f"{registry}/{oci.repository}@{image.digest}"
        model = read_model(client, oci.repository, image, shown)
        manifest = manifest_for(oci, registry, client.base, image, model)
    if lock is not None:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(lock, manifest.text.encode())
        except OSError:
            pass  # a read-only store: the reference resolves online only, as it just did
    return manifest


def lock_path(lock_dir: Path | None, registry: str, oci: OciName) -> Path | None:
    """Where the manifest an OCI reference last resolved to is kept, so ``--offline`` runs it again
    without asking the registry (a tag moves only when the registry is asked)."""
    if lock_dir is None:
        return None
    key = f"{registry}/{oci.repository}:{oci.reference}"
    return lock_dir / "oci" / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".toml")


# ---- push: ollama's layout (a config blob, the GGUF as the model layer, text layers) ----------------

_CHUNK = 1 << 20


@dataclass(frozen=True)
class PushLayer:
    """One blob to push: a file on disk or bytes in memory, with its media type."""

    media_type: str
    sha256: str
    size: int
    path: Path | None = None
    data: bytes | None = None

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha256

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}

    def body(self) -> Iterator[bytes]:
        if self.data is not None:
            yield self.data
            return
        with open(self.path, "rb") as f:  # type: ignore[arg-type]
            while chunk := f.read(_CHUNK):
                yield chunk


def text_layer(kind: str, text: str) -> PushLayer:
    """An ollama text layer (``template``, ``system``, ``params``, ``license``)."""
    data = text.encode()
    return PushLayer(f"application/vnd.ollama.image.{kind}", hashlib.sha256(data).hexdigest(), len(data),
                     data=data)


def ollama_config(model: PushLayer, others: list[PushLayer], *, family: str, file_type: str,
                  parameters: int, context_length: int) -> PushLayer:
    """ollama's config blob (model format, family, type, file type, rootfs), plus the weight count and
    context length our resolver reads (extra keys, which ollama ignores)."""
    size = f"{parameters / 1e9:.1f}B" if parameters >= 1e9 else f"{parameters / 1e6:.0f}M"
    data = json.dumps({
        "model_format": "gguf", "model_family": family, "model_families": [family], "model_type": size,
        "file_type": file_type, "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [x.digest for x in [model, *others]]},
        "parameters": parameters, "context_length": context_length,
    }, separators=(",", ":")).encode()
    return PushLayer(OLLAMA_CONFIG, hashlib.sha256(data).hexdigest(), len(data), data=data)


def image_manifest(config: PushLayer, layers: list[PushLayer]) -> bytes:
    return json.dumps({
        "schemaVersion": 2, "mediaType": MANIFEST_TYPES[0], "config": config.descriptor(),
        "layers": [x.descriptor() for x in layers],
    }, separators=(",", ":")).encode()


def push_scope(repository: str) -> str:
    return f"repository:{repository}:pull,push"


def push_blob(client: RegistryClient, repository: str, layer: PushLayer) -> bool:
    """Upload ``layer`` unless the registry has it (HEAD); a monolithic upload (POST, then PUT with the
    digest, which the registry checks). True when it was uploaded."""
    scope = push_scope(repository)
    where = f"{client.registry}/{repository}"
    head = client.request("HEAD", f"/v2/{repository}/blobs/{layer.digest}", scope=scope, what=where)
    if head.status_code == 200:
        return False
    start = client.request("POST", f"/v2/{repository}/blobs/uploads/", scope=scope, what=where)
    location = start.headers.get("location", "")
    if start.status_code != 202 or not location:
        raise RegistryError(f"the registry refused to start an upload to {where} (HTTP {start.status_code})",
                            "check that the account may push there")
    url = location if location.startswith(("http://", "https://")) else client.base + location
    url += ("&" if "?" in url else "?") + f"digest={layer.digest}"
    done = client.request("PUT", url, scope=scope, content=layer.body, what=where,
                          headers={"Content-Type": "application/octet-stream",
                                   "Content-Length": str(layer.size)})
    if done.status_code != 201:
        raise RegistryError(f"the registry refused blob {layer.digest} for {where} (HTTP {done.status_code}: "
                            f"{done.text[:200]!r})", "check the registry's logs")
    return True


def push_manifest(client: RegistryClient, repository: str, tag: str, manifest: bytes) -> str:
    """PUT the manifest under ``tag``; returns its digest (checked against what the registry says)."""
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    where = f"{client.registry}/{repository}:{tag}"
    resp = client.request("PUT", f"/v2/{repository}/manifests/{tag}", scope=push_scope(repository),
                          content=manifest, headers={"Content-Type": MANIFEST_TYPES[0]}, what=where)
    if resp.status_code != 201:
        raise RegistryError(f"the registry refused the manifest for {where} (HTTP {resp.status_code}: "
                            f"{resp.text[:200]!r})", "check the registry's logs")
    said = resp.headers.get("docker-content-digest")
    if said and said != digest:
        raise RegistryError(f"the registry stored the manifest of {where} as {said}, not {digest}",
                            "the registry altered the manifest; ask whoever runs it")
    return digest


@dataclass(frozen=True)
class PushResult:
    reference: str
    digest: str
    uploaded: int    # blobs uploaded (the others were there already)
    blobs: int


def push_image(registry: str, repository: str, tag: str, config: PushLayer, layers: list[PushLayer], *,
               credentials: tuple[str, str] | None = None, allow_http: bool = False) -> PushResult:
    """Push blobs then the manifest of an image in ollama's layout."""
    with RegistryClient(registry, credentials=credentials, allow_http=allow_http) as client:
        client.authorization(push_scope(repository))
        uploaded = sum(push_blob(client, repository, x) for x in [*layers, config])
        digest = push_manifest(client, repository, tag, image_manifest(config, layers))
    return PushResult(f"{registry}/{repository}:{tag}", digest, uploaded, len(layers) + 1)


def push_gguf(path: Path, dest: Reference, options: Any, *, sha256: str | None = None,
              license_text: str | None = None, on_bytes: Callable[[int], None] | None = None) -> PushResult:
    """Push the GGUF at ``path`` to ``dest`` (an ``oci`` reference with a tag) in ollama's layout: the
    GGUF as the model layer, a license layer when there is one, and a config blob with the family,
    file type, weight count and context length read from the GGUF's header."""
    from pipx_llama.formats.gguf import open_gguf
    from pipx_llama.models.store import sha256_file

    if dest.oci is None or dest.oci.digest:
        raise UsageError(f"{dest.text} is not a place to push to",
                         "give [REGISTRY/]NAMESPACE/NAME[:TAG] (a tag, not a digest)")
    g = open_gguf(path)
    try:
        md = g.metadata
        arch = str(md.get("general.architecture") or "unknown")
        ctx = md.get(f"{arch}.context_length")
        params = sum(t.n_elements for t in g.tensors.values())
        file_type = md.get("general.file_type")
    finally:
        g.close()
    digest = sha256 or sha256_file(path, on_bytes)
    model = PushLayer(OLLAMA_MODEL, digest, path.stat().st_size, path=path)
    others = [text_layer("license", license_text)] if license_text else []
    config = ollama_config(model, others, family=arch, file_type=_file_type(file_type),
                           parameters=max(1, params),
                           context_length=int(ctx) if isinstance(ctx, int) else 4096)
    registry = dest.oci.registry or options.registry
    return push_image(registry, dest.oci.repository, dest.oci.tag or DEFAULT_TAG, config, [model, *others],
                      credentials=credentials_for(registry, options.registry_credentials),
                      allow_http=options.allow_http)


def _file_type(value: object) -> str:
    """The GGUF's declared file type by llama.cpp's name (Q4_1, Q8_0, ...), or GGUF when it says none."""
    from gguf import LlamaFileType

    try:
        return LlamaFileType(int(value)).name.removeprefix("MOSTLY_")  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "GGUF"
