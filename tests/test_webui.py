"""The chat page served at ``/`` by ``pipx-llama serve``: its files and headers, its place in the
wheel, ``serve --open``, and an end-to-end run in headless Chromium against a live server on the real
SmolLM2 model (streaming, Stop, settings, the API-key prompt, conversations kept across reloads,
model text that must stay text, errors, phone width). Screenshots go to ``test-artifacts/``.
"""

from __future__ import annotations

import json
import os
import re
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
    chromium_path,
    screenshot_dir,
    start_server,
    sync_playwright,
    wait_until,
)
from starlette.testclient import TestClient

from pipx_llama.server import ModelRegistry, ModelSpec, ServerSettings, create_app

REPO = Path(__file__).resolve().parent.parent
STATIC = REPO / "pipx_llama" / "server" / "static"
PAGE_FILES = ["index.html", "app.css", "app.js", "favicon.svg"]
KEY = "webui-test-key-42"
N_CTX = 1024
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
PAYLOAD = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'


# -- the files and how they are served (no browser) ---------------------------------------------------------


def _app(api_key: str | None = None) -> TestClient:
    registry = ModelRegistry([ModelSpec("m", Path("/nonexistent/m.gguf"))])
    settings = ServerSettings(api_key=api_key, allowed_hosts=["127.0.0.1", "localhost", "testserver"])
    return TestClient(create_app(registry, settings))


def test_page_files_are_served_with_a_strict_policy() -> None:
    client = _app(api_key="k")
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "<title>pipx-llama chat</title>" in r.text
    csp = {d.split()[0]: d.split()[1:] for d in r.headers["content-security-policy"].split("; ")}
    assert csp["default-src"] == ["'self'"] and csp["script-src"] == ["'self'"]
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


def test_page_is_self_contained_and_never_writes_html() -> None:
    html = (STATIC / "index.html").read_text()
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, re.DOTALL)
    assert scripts == [(' src="app.js" defer', "")], "no inline script: the CSP forbids it"
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
                 "setAttribute(\"on", "srcdoc"):
        assert sink not in js, f"app.js uses {sink}: model text must only ever become text nodes"
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
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        shipped = {n.removeprefix("pipx_llama/server/static/") for n in names
                   if n.startswith("pipx_llama/server/static/")}
        assert shipped == set(PAGE_FILES), shipped
        for name in PAGE_FILES:
            assert zf.read(f"pipx_llama/server/static/{name}") == (STATIC / name).read_bytes(), name


def test_serve_open_starts_the_browser_once_listening(tmp_path: Path) -> None:
    """``--open`` hands the page's URL to the default browser ($BROWSER here) after start-up."""
    model = tmp_path / "tiny.gguf"
    model.write_bytes(b"")  # loaded on first use only, which this test never makes
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


@pytest.fixture(scope="module")
def live(smollm2_path: Path) -> Iterator[LiveServer]:
    # one thread: numba's parallel kernels crawl when another process holds a core (shared CI machines)
    server = start_server(["-m", str(smollm2_path), "--port", "0", "-c", str(N_CTX), "--api-key", KEY,
                           "--preload", "-t", "1"])
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
    """One browser context (its own localStorage) on the live server, with the requests it made."""

    def __init__(self, browser: Any, live: LiveServer, *, viewport: dict = DESKTOP, bypass_csp: bool = False,
                 key: str | None = KEY) -> None:
        self.live = live
        self.context = browser.new_context(viewport=viewport, bypass_csp=bypass_csp)
        self.requests: list[str] = []
        self.bodies: list[dict] = []
        self.errors: list[str] = []
        self.context.on("request", self._on_request)
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", self._on_console)
        self.page.set_default_timeout(30_000)
        if key:  # seed the key on the server's origin (the JSON /health page) so no dialog opens
            self.page.goto(live.url + "/health")
            self.page.evaluate("k => localStorage.setItem('pipx-llama.apiKey', k)", key)
        self.page.goto(live.url + "/")

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

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(screenshot_dir() / name))

    def close(self) -> None:
        foreign = [u for u in self.requests if not u.startswith(self.live.url + "/")]
        self.context.close()
        assert not foreign, f"the page made requests to other sites: {foreign}"
        assert not self.errors, f"errors in the page: {self.errors}"


@pytest.fixture
def page_factory(browser: Any, live: LiveServer) -> Iterator[Any]:
    pages: list[Page] = []

    def make(**kw: Any) -> Page:
        p = Page(browser, live, **kw)
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
    p.shot("desktop-chat.png")

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
    max_tokens = 900
    p.set_settings(temperature="0", max_tokens=str(max_tokens))
    p.send("Count from 1 to 1000, one number per line.")
    stop = p.page.locator("#stop")
    stop.wait_for(state="visible")
    wait_until(lambda: len(p.last_answer()["text"]) >= 12, 60, "the answer to start")
    p.shot("desktop-streaming.png")  # mid-answer, with the Stop button
    t_stop = time.monotonic()
    stop.click()
    answer = p.wait_answer(timeout=10)
    print(f"stopped after {time.monotonic() - t_stop:.2f} s: {answer}")
    assert answer["state"] == "stopped" and "stopped" in answer["meta"] and answer["text"], answer
    assert p.page.locator("#send").is_visible() and not stop.is_visible()
    rec = live.record(answer["requestId"])
    print(f"server record of the stopped request: {rec}")
    generated, limit = map(int, rec["generated"].split("/"))
    assert rec["finish"] == "cancelled" and limit == max_tokens and generated < max_tokens // 4, rec
    assert httpx.get(live.url + "/health").json()["queue"]["running"] == 0
    # the partial answer is kept, marked as stopped, and is part of the next turn's history
    p.page.reload()
    p.wait_models()
    assert p.last_answer()["state"] == "stopped"
    assert p.stored()[0]["messages"][1]["state"] == "stopped"


def test_conversations_new_rename_delete(page_factory: Any) -> None:
    p = page_factory()
    p.wait_models()
    convs = [{"id": f"c{i}", "title": f"Chat {i}", "created": i, "updated": i,
              "messages": [{"role": "user", "content": f"hello {i}"},
                           {"role": "assistant", "content": f"answer {i}", "state": "done"}]} for i in (1, 2)]
    p.js("c => localStorage.setItem('pipx-llama.conversations', JSON.stringify(c))", convs)
    p.page.reload()
    p.wait_models()
    titles = p.page.locator(".conv-open")
    assert titles.all_inner_texts() == ["Chat 2", "Chat 1"]  # most recent first

    titles.nth(1).click()
    assert p.page.inner_text("#conv-title") == "Chat 1" and p.last_answer()["text"] == "answer 1"

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


# prompts SmolLM2 answers (greedily) with raw HTML outside any code block
HTML_PROMPTS = [
    ('Reply with the HTML only, no code block: <img src=x onerror="window.__pwned=2">', "<img"),
    (("Write one line of HTML: a script tag that sets window.__pwned=1, then an img tag with src=x and "
     'onerror="window.__pwned=2". Reply with the HTML only, no code block.'),
     "<script"),
]


def _assert_inert(p: Page) -> None:
    assert p.js("() => window.__pwned") is None
    bad = p.js("""() => [...document.querySelectorAll('#messages script, #messages img, #messages iframe')]
                       .map(e => e.outerHTML)
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
                          "meta": {"model": PAYLOAD, "tokens": "<b>1</b>"}}]}
    p.js("c => { localStorage.setItem('pipx-llama.conversations', JSON.stringify([c]));"
         " localStorage.setItem('pipx-llama.active', JSON.stringify('x')); }", conv)
    p.page.reload()
    p.wait_models()
    p.page.wait_for_timeout(300)  # time for an image error handler to have fired
    _assert_inert(p)
    body = p.page.locator(".msg-assistant .msg-body")
    text = body.inner_text()
    assert text.count(PAYLOAD) == 2, text  # once in the code block, once as a paragraph
    assert "<a href=\"javascript:window.__pwned=4\">click</a>" in text
    assert "[bad link](javascript:window.__pwned=3)" in text
    assert p.page.inner_text("#conv-title") == PAYLOAD
    assert p.page.inner_text(".msg-user .msg-body") == PAYLOAD
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
    p.shot("desktop-error.png")
    # Retry, once the server is back, answers normally
    p.page.unroute("**/v1/chat/completions")
    p.page.locator(".msg-assistant .msg-meta button", has_text="Retry").click()
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


def test_screenshots_and_phone_width(page_factory: Any) -> None:
    conv = {"id": "shot", "title": "Markdown and code", "created": 1, "updated": 1,
            "messages": [{"role": "user", "content": "Show me what Markdown looks like here."},
                         {"role": "assistant", "content": MARKDOWN_REPLY, "state": "done",
                          "meta": {"model": "SmolLM2-135M-Instruct.Q4_1", "tokens": 93,
                                   "tokensPerSecond": 41.5}}]}
    seed = ("c => { localStorage.setItem('pipx-llama.conversations', JSON.stringify([c]));"
            " localStorage.setItem('pipx-llama.active', JSON.stringify(c.id)); }")
    desk = page_factory()
    desk.js(seed, conv)
    desk.page.reload()
    desk.wait_models()
    desk.shot("desktop-markdown.png")

    phone = page_factory(viewport=PHONE)
    phone.js(seed, conv)
    phone.page.reload()
    phone.wait_models()
    # everything fits the width; the conversation list is a drawer behind the menu button
    assert phone.js("() => document.documentElement.scrollWidth") <= PHONE["width"]
    assert phone.js("() => { const m = document.querySelector('.messages');"
                    " return m.scrollWidth <= m.clientWidth; }")
    assert not phone.page.locator("#sidebar").is_visible() and phone.page.locator("#menu-btn").is_visible()
    for sel in ("#input", "#send", "#model", "#settings-btn"):
        box = phone.page.locator(sel).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], (sel, box)
    phone.shot("phone-chat.png")
    phone.page.locator("#menu-btn").click()
    phone.page.locator("#sidebar").wait_for(state="visible")
    phone.page.wait_for_timeout(300)  # the drawer slides in
    phone.shot("phone-conversations.png")
    phone.page.keyboard.press("Escape")
    phone.page.locator("#sidebar").wait_for(state="hidden")

    # keyboard: focus is visible, and Tab reaches the controls
    desk.page.locator("#input").focus()
    desk.page.keyboard.press("Shift+Tab")
    outline = desk.js("() => getComputedStyle(document.activeElement).outlineStyle")
    assert outline not in ("none", ""), outline
    assert os.path.getsize(screenshot_dir() / "phone-chat.png") > 10_000
