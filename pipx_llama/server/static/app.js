// pipx-llama's chat page: talks to this server's OpenAI-compatible API (streaming), keeps
// conversations in localStorage, and renders the model's Markdown by building DOM nodes.
// Model text only ever reaches the page as text nodes (textContent / append(string)); never as HTML.
"use strict";

(() => {
  const KEYS = {
    convs: "pipx-llama.conversations",
    active: "pipx-llama.active",
    settings: "pipx-llama.settings",
    model: "pipx-llama.model",
    apiKey: "pipx-llama.apiKey",
  };
  const DEFAULT_SETTINGS = { temperature: null, top_p: null, max_tokens: null, system: "" };
  const MAX_NESTING = 16; // Markdown nesting beyond this is shown as plain text

  const $ = (id) => document.getElementById(id);
  const ui = {
    sidebar: $("sidebar"), scrim: $("scrim"), menuBtn: $("menu-btn"), newChat: $("new-chat"),
    convList: $("conv-list"), title: $("conv-title"), model: $("model"), settingsBtn: $("settings-btn"),
    banner: $("banner"), bannerText: $("banner-text"), bannerRetry: $("banner-retry"),
    bannerClose: $("banner-close"), messages: $("messages"), empty: $("empty"), composer: $("composer"),
    input: $("input"), send: $("send"), stop: $("stop"),
    settings: $("settings"), settingsForm: $("settings-form"), settingsError: $("settings-error"),
    setTemperature: $("set-temperature"), setTopP: $("set-top-p"), setMaxTokens: $("set-max-tokens"),
    setSystem: $("set-system"), settingsReset: $("settings-reset"), settingsCancel: $("settings-cancel"),
    keyDialog: $("key-dialog"), keyForm: $("key-form"), keyInput: $("key-input"), keyError: $("key-error"),
    keyCancel: $("key-cancel"),
  };

  const state = {
    convs: [],        // [{id, title, renamed, created, updated, messages: [{role, content, state, meta, error}]}]
    activeId: null,
    settings: { ...DEFAULT_SETTINGS },
    models: [],
    busy: null,       // {convId, msg, controller} while an answer streams
  };
  const msgNodes = new Map(); // message object -> its <article>, for the conversation on screen

  // -- small helpers ---------------------------------------------------------------------------------

  function el(tag, props, ...kids) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v === undefined || v === null) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("data-") || k.startsWith("aria-")) node.setAttribute(k, v);
      else node[k] = v;
    }
    node.append(...kids); // strings become text nodes
    return node;
  }

  function newId() {
    return Date.now().toString(36) + Math.random().toString(36).slice(2, 10);
  }

  function storageGet(key, fallback) {
    try {
      const raw = localStorage.getItem(key);
      return raw === null ? fallback : JSON.parse(raw);
    } catch {
      return fallback;
    }
  }

  function storageSet(key, value) {
    try {
      localStorage.setItem(key, JSON.stringify(value));
      return true;
    } catch (err) {
      showBanner(`Could not save to this browser's storage (${err.name}). Delete old conversations to make room.`);
      return false;
    }
  }

  // -- Markdown (a small subset) to DOM ------------------------------------------------------------

  const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)[^`]*$/;
  const HEADING = /^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$/;
  const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
  const QUOTE = /^ {0,3}> ?(.*)$/;
  const ITEM = /^( *)([-*+]|\d{1,9}[.)])[ \t]+(.*)$/;
  const BLANK = /^\s*$/;

  function isBlockStart(line) {
    return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line);
  }

  function renderMarkdown(text, parent) {
    renderBlocks(String(text).replace(/\r\n?/g, "\n").split("\n"), parent, 0);
  }

  function renderBlocks(lines, parent, depth) {
    if (depth > MAX_NESTING) {
      parent.append(el("p", { text: lines.join("\n"), class: "plain" }));
      return;
    }
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let m;
      if (BLANK.test(line)) {
        i++;
      } else if ((m = FENCE.exec(line))) {
        const closing = new RegExp(`^ {0,3}${m[1][0] === "`" ? "`" : "~"}{${m[1].length},}\\s*$`);
        const body = [];
        for (i++; i < lines.length && !closing.test(lines[i]); i++) body.push(lines[i]);
        i++; // the closing fence (an answer still streaming may not have it yet)
        parent.append(codeBlock(body.join("\n"), m[2]));
      } else if ((m = HEADING.exec(line))) {
        const h = el(`h${Math.min(m[1].length + 2, 6)}`);
        renderInline(m[2], h, depth);
        parent.append(h);
        i++;
      } else if (RULE.test(line)) {
        parent.append(el("hr"));
        i++;
      } else if (QUOTE.test(line)) {
        const inner = [];
        for (; i < lines.length && (m = QUOTE.exec(lines[i])); i++) inner.push(m[1]);
        const q = el("blockquote");
        renderBlocks(inner, q, depth + 1);
        parent.append(q);
      } else if (ITEM.test(line)) {
        i = renderList(lines, i, parent, depth);
      } else {
        const para = [line];
        for (i++; i < lines.length && !BLANK.test(lines[i]) && !isBlockStart(lines[i]); i++) para.push(lines[i]);
        const p = el("p");
        para.forEach((l, k) => {
          if (k) p.append(el("br"));
          renderInline(l.trim(), p, depth);
        });
        parent.append(p);
      }
    }
  }

  function renderList(lines, i, parent, depth) {
    const first = ITEM.exec(lines[i]);
    const indent = first[1].length;
    const ordered = /\d/.test(first[2]);
    const list = el(ordered ? "ol" : "ul");
    if (ordered && parseInt(first[2], 10) !== 1) list.start = parseInt(first[2], 10);
    let item = null;
    const flush = () => {
      if (!item) return;
      const li = el("li");
      renderBlocks(item, li, depth + 1);
      list.append(li);
    };
    let contentIndent = 0;
    while (i < lines.length) {
      const line = lines[i];
      const m = ITEM.exec(line);
      if (m && m[1].length <= indent + 1 && /\d/.test(m[2]) === ordered) {
        flush();
        item = [m[3]];
        contentIndent = m[1].length + m[2].length + 1;
        i++;
        continue;
      }
      if (m && m[1].length <= indent + 1) break; // a list of the other kind starts
      const lead = line.length - line.trimStart().length;
      if (BLANK.test(line)) {
        let j = i + 1;
        while (j < lines.length && BLANK.test(lines[j])) j++;
        const next = j < lines.length ? lines[j] : null;
        const nm = next === null ? null : ITEM.exec(next);
        const continues = next !== null && ((nm && nm[1].length <= indent + 1 && /\d/.test(nm[2]) === ordered)
          || next.length - next.trimStart().length > indent + 1);
        if (!continues) break;
        item.push("");
        i++;
      } else if (lead > indent + 1) {
        item.push(line.slice(Math.min(lead, contentIndent)));
        i++;
      } else if (!isBlockStart(line) && item.length && !BLANK.test(item[item.length - 1])) {
        item.push(line); // a lazy continuation of the item's paragraph
        i++;
      } else {
        break;
      }
    }
    flush();
    parent.append(list);
    return i;
  }

  // a URL may hold balanced parentheses (Wikipedia's do) but not end in punctuation
  const URL_BODY = "(?:[^\\s<>\"'`()]|\\([^\\s<>\"'`()]*\\))*(?:[^\\s<>\"'`()\\[\\].,;:!?]|\\([^\\s<>\"'`()]*\\))";
  const INLINE = new RegExp([
    "(?<!`)(?<tick>`+)(?!`)(?<code>[\\s\\S]*?[^`])\\k<tick>(?!`)",
    "\\*\\*\\*(?=\\S)(?<bi>[\\s\\S]*?\\S)\\*\\*\\*",
    "\\*\\*(?=\\S)(?<b1>[\\s\\S]*?\\S)\\*\\*",
    "(?<![\\w_])__(?=\\S)(?<b2>[\\s\\S]*?\\S)__(?![\\w_])",
    "\\*(?=[^\\s*])(?<i1>[\\s\\S]*?[^\\s*]|)\\*(?!\\*)",
    "(?<![\\w_])_(?=[^\\s_])(?<i2>[\\s\\S]*?[^\\s_]|)_(?![\\w_])",
    "\\[(?<label>[^\\[\\]\\n]+)\\]\\(\\s*<?(?<url>(?:[^\\s<>()]|\\([^\\s<>()]*\\))+)>?\\s*\\)",
    `(?<bare>\\bhttps?:\\/\\/${URL_BODY})`,
  ].join("|"), "g");

  function safeUrl(raw) {
    try {
      const url = new URL(raw); // relative URLs throw: only absolute links are made
      return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
    } catch {
      return null;
    }
  }

  function link(href, parent, label, depth) {
    const a = el("a", { href, target: "_blank", rel: "noopener noreferrer" });
    if (label === null) a.append(href);
    else renderInline(label, a, depth + 1);
    parent.append(a);
  }

  function renderInline(text, parent, depth) {
    if (depth > MAX_NESTING) {
      parent.append(text);
      return;
    }
    const re = new RegExp(INLINE.source, "g");
    let last = 0;
    let m;
    while ((m = re.exec(text))) {
      if (m.index > last) parent.append(text.slice(last, m.index));
      last = re.lastIndex;
      const g = m.groups;
      if (g.code !== undefined) {
        parent.append(el("code", { text: g.code.length > 2 && /^ .* $/.test(g.code) ? g.code.slice(1, -1) : g.code }));
      } else if (g.bi !== undefined) {
        const em = el("em");
        renderInline(g.bi, em, depth + 2);
        parent.append(el("strong", {}, em));
      } else if (g.b1 !== undefined || g.b2 !== undefined) {
        const b = el("strong");
        renderInline(g.b1 ?? g.b2, b, depth + 1);
        parent.append(b);
      } else if (g.i1 !== undefined || g.i2 !== undefined) {
        const em = el("em");
        renderInline(g.i1 ?? g.i2, em, depth + 1);
        parent.append(em);
      } else if (g.label !== undefined) {
        const href = safeUrl(g.url);
        if (href) link(href, parent, g.label, depth);
        else parent.append(m[0]); // javascript:, data:, relative...: shown as the text it is
      } else {
        const href = safeUrl(g.bare);
        if (href) link(href, parent, null, depth);
        else parent.append(m[0]);
      }
    }
    if (last < text.length) parent.append(text.slice(last));
  }

  function codeBlock(code, lang) {
    const codeEl = el("code", { text: code });
    const copy = el("button", { type: "button", class: "btn btn-small copy", text: "Copy" });
    copy.addEventListener("click", () => copyText(code, copy, codeEl));
    return el("div", { class: "code" },
      el("div", { class: "code-head" }, el("span", { class: "code-lang", text: lang || "code" }), copy),
      el("pre", {}, codeEl));
  }

  async function copyText(text, button, node) {
    try {
      if (!navigator.clipboard) throw new Error("no clipboard");
      await navigator.clipboard.writeText(text);
      button.textContent = "Copied";
    } catch {
      // pages served over plain http from another machine get no clipboard API: select for Ctrl+C
      const range = document.createRange();
      range.selectNodeContents(node);
      const sel = window.getSelection();
      sel.removeAllRanges();
      sel.addRange(range);
      button.textContent = "Selected";
    }
    setTimeout(() => { button.textContent = "Copy"; }, 1500);
  }

  // -- persistence ------------------------------------------------------------------------------------

  function validMessage(m) {
    return m && typeof m === "object" && ["user", "assistant"].includes(m.role) && typeof m.content === "string";
  }

  function cleanMeta(meta) {
    const out = {};
    if (!meta || typeof meta !== "object") return out;
    for (const k of ["model", "requestId", "finish"]) if (typeof meta[k] === "string") out[k] = meta[k];
    for (const k of ["tokens", "tokensPerSecond", "seconds"]) {
      if (typeof meta[k] === "number" && Number.isFinite(meta[k])) out[k] = meta[k];
    }
    return out;
  }

  function loadConversations() {
    const raw = storageGet(KEYS.convs, []);
    const convs = Array.isArray(raw) ? raw : [];
    state.convs = convs
      .filter((c) => c && typeof c === "object" && typeof c.id === "string" && Array.isArray(c.messages))
      .map((c) => ({
        id: c.id,
        title: typeof c.title === "string" && c.title ? c.title : "New chat",
        renamed: !!c.renamed,
        created: Number(c.created) || Date.now(),
        updated: Number(c.updated) || Date.now(),
        messages: c.messages.filter(validMessage).map((m) => ({
          role: m.role,
          content: m.content,
          // an answer that was streaming when the page went away was cut off
          state: m.state === "streaming" ? "stopped" : (typeof m.state === "string" ? m.state : "done"),
          meta: cleanMeta(m.meta),
          error: typeof m.error === "string" ? m.error : undefined,
        })),
      }));
    const active = storageGet(KEYS.active, null);
    state.activeId = state.convs.some((c) => c.id === active) ? active : null;
  }

  let saveTimer = null;
  function saveConversations(soon = false) {
    clearTimeout(saveTimer);
    saveTimer = null;
    if (soon) {
      saveTimer = setTimeout(() => saveConversations(false), 500);
      return;
    }
    storageSet(KEYS.convs, state.convs);
    storageSet(KEYS.active, state.activeId);
  }

  function loadSettings() {
    const s = storageGet(KEYS.settings, {});
    const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);
    state.settings = {
      temperature: num(s.temperature),
      top_p: num(s.top_p),
      max_tokens: num(s.max_tokens),
      system: typeof s.system === "string" ? s.system : "",
    };
  }

  // -- the API ----------------------------------------------------------------------------------------

  class RequestError extends Error {}

  function authHeaders() {
    const key = localStorage.getItem(KEYS.apiKey);
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  function unreachable() {
    return new RequestError(`Cannot reach the pipx-llama server at ${location.origin}. Is \`pipx-llama serve\` ` +
      "still running? Start it again, then retry.");
  }

  async function errorMessage(res) {
    let detail = "";
    try {
      const body = await res.clone().json();
      const e = body && body.error;
      detail = typeof e === "string" ? e : (e && typeof e.message === "string" ? e.message : "");
    } catch {
      try { detail = (await res.text()).slice(0, 500); } catch { /* nothing more to show */ }
    }
    const retry = res.headers.get("Retry-After");
    return `The server answered ${res.status}${res.statusText ? " " + res.statusText : ""}` +
      (detail ? `: ${detail}` : ".") + (retry ? ` (retry in ${retry} s)` : "");
  }

  // fetch with the key; on 401 ask for the key (once per rejection) and try again
  async function api(path, options = {}) {
    for (;;) {
      let res;
      try {
        res = await fetch(path, { ...options, headers: { ...(options.headers || {}), ...authHeaders() } });
      } catch (err) {
        if (err.name === "AbortError") throw err;
        throw unreachable();
      }
      if (res.status !== 401) return res;
      const had = localStorage.getItem(KEYS.apiKey);
      const key = await askForKey(had ? "The saved key was not accepted; enter the current one." : "");
      if (key === null) throw new RequestError("This server needs an API key; none was given.");
      localStorage.setItem(KEYS.apiKey, key);
    }
  }

  let keyPrompt = null; // one dialog even when several requests need the key at once
  function askForKey(problem) {
    if (keyPrompt) return keyPrompt;
    keyPrompt = new Promise((resolve) => {
      ui.keyError.textContent = problem;
      ui.keyError.hidden = !problem;
      ui.keyInput.value = "";
      const finish = (value) => {
        ui.keyForm.removeEventListener("submit", onSubmit);
        ui.keyCancel.removeEventListener("click", onCancel);
        ui.keyDialog.removeEventListener("cancel", onCancel);
        if (ui.keyDialog.open) ui.keyDialog.close();
        keyPrompt = null;
        resolve(value);
      };
      const onSubmit = (e) => {
        e.preventDefault();
        const key = ui.keyInput.value.trim();
        if (!key) {
          ui.keyError.textContent = "Enter the key the server was started with (--api-key).";
          ui.keyError.hidden = false;
          return;
        }
        finish(key);
      };
      const onCancel = (e) => {
        e.preventDefault();
        finish(null);
      };
      ui.keyForm.addEventListener("submit", onSubmit);
      ui.keyCancel.addEventListener("click", onCancel);
      ui.keyDialog.addEventListener("cancel", onCancel);
      ui.keyDialog.showModal();
      ui.keyInput.focus();
    });
    return keyPrompt;
  }

  async function loadModels() {
    try {
      const res = await api("v1/models");
      if (!res.ok) throw new RequestError(await errorMessage(res));
      const body = await res.json();
      state.models = (body.data || []).map((m) => String(m.id));
      if (!state.models.length) throw new RequestError("The server offers no model.");
      hideBanner();
    } catch (err) {
      state.models = [];
      showBanner(err instanceof RequestError ? err.message : `Could not list the models: ${err}`, loadModels);
    }
    renderModels();
  }

  // -- conversations ----------------------------------------------------------------------------------

  function activeConv() {
    return state.convs.find((c) => c.id === state.activeId) || null;
  }

  function newConversation() {
    const conv = { id: newId(), title: "New chat", renamed: false, created: Date.now(), updated: Date.now(),
      messages: [] };
    state.convs.push(conv);
    state.activeId = conv.id;
    return conv;
  }

  function selectConversation(id) {
    state.activeId = id;
    saveConversations();
    renderAll();
    closeSidebar();
    ui.input.focus();
  }

  function deleteConversation(conv) {
    if (!window.confirm(`Delete the conversation "${conv.title}"?`)) return;
    if (state.busy && state.busy.convId === conv.id) state.busy.controller.abort();
    state.convs = state.convs.filter((c) => c !== conv);
    if (state.activeId === conv.id) state.activeId = null;
    saveConversations();
    renderAll();
  }

  function startRename(conv, li) {
    const input = el("input", { type: "text", class: "rename", value: conv.title, maxLength: 200,
      "aria-label": "Conversation name" });
    let done = false;
    const finish = (keep) => {
      if (done) return;
      done = true;
      const name = input.value.trim();
      if (keep && name && name !== conv.title) {
        conv.title = name;
        conv.renamed = true;
        saveConversations();
      }
      renderAll();
      const again = ui.convList.querySelector(`li[data-id="${CSS.escape(conv.id)}"] .conv-rename`);
      if (again) again.focus();
    };
    input.addEventListener("keydown", (e) => {
      if (e.key === "Enter") { e.preventDefault(); finish(true); }
      if (e.key === "Escape") { e.preventDefault(); e.stopPropagation(); finish(false); }
    });
    input.addEventListener("blur", () => finish(true));
    li.replaceChildren(input);
    input.focus();
    input.select();
  }

  // -- rendering --------------------------------------------------------------------------------------

  function renderAll() {
    renderSidebar();
    renderConversation();
    renderComposer();
  }

  function renderSidebar() {
    const items = [...state.convs].sort((a, b) => b.updated - a.updated).map((conv) => {
      const active = conv.id === state.activeId;
      const open = el("button", { type: "button", class: "conv-open", text: conv.title, title: conv.title });
      open.addEventListener("click", () => selectConversation(conv.id));
      const rename = el("button", { type: "button", class: "icon-btn conv-rename", text: "\u270E",
        title: "Rename", "aria-label": `Rename "${conv.title}"` });
      const del = el("button", { type: "button", class: "icon-btn conv-delete", text: "\u2715",
        title: "Delete", "aria-label": `Delete "${conv.title}"` });
      const li = el("li", { class: "conv" + (active ? " active" : ""), "data-id": conv.id }, open, rename, del);
      if (active) open.setAttribute("aria-current", "true");
      rename.addEventListener("click", () => startRename(conv, li));
      del.addEventListener("click", () => deleteConversation(conv));
      return li;
    });
    ui.convList.replaceChildren(...items);
  }

  function renderModels() {
    const saved = storageGet(KEYS.model, null);
    const current = ui.model.value || saved;
    ui.model.replaceChildren(...state.models.map((id) => el("option", { value: id, text: id })));
    if (state.models.includes(current)) ui.model.value = current;
    ui.model.disabled = !state.models.length;
    renderComposer();
  }

  function renderConversation() {
    const conv = activeConv();
    ui.title.textContent = conv ? conv.title : "New chat";
    document.title = conv ? `${conv.title} · pipx-llama` : "pipx-llama chat";
    msgNodes.clear();
    const nodes = conv ? conv.messages.map((m) => messageNode(conv, m)) : [];
    ui.messages.replaceChildren(ui.empty, ...nodes);
    ui.empty.hidden = nodes.length > 0;
    ui.messages.scrollTop = ui.messages.scrollHeight;
  }

  function messageNode(conv, msg) {
    const node = el("article", { class: `msg msg-${msg.role}`, "data-role": msg.role });
    msgNodes.set(msg, node);
    fillMessage(conv, msg, node);
    return node;
  }

  function fillMessage(conv, msg, node) {
    node.dataset.state = msg.state || "done";
    if (msg.meta && msg.meta.requestId) node.dataset.requestId = msg.meta.requestId;
    const body = el("div", { class: "msg-body" });
    if (msg.role === "user") {
      body.classList.add("plain");
      body.textContent = msg.content;
    } else if (msg.state === "streaming" && !msg.content) {
      body.append(el("span", { class: "thinking", text: "Thinking\u2026" }));
    } else {
      renderMarkdown(msg.content, body);
    }
    const kids = [el("div", { class: "msg-role", text: msg.role === "user" ? "You" : (msg.meta.model || "Assistant") }),
      body];
    if (msg.error) kids.push(el("p", { class: "error-text msg-error", role: "alert", text: msg.error }));
    const meta = metaText(msg);
    if (meta || (msg.role === "assistant" && msg.state === "error")) {
      const foot = el("div", { class: "msg-meta" }, el("span", { text: meta }));
      if (msg.role === "assistant" && msg.state === "error" && conv.messages[conv.messages.length - 1] === msg) {
        const retry = el("button", { type: "button", class: "btn btn-small", text: "Retry" });
        retry.addEventListener("click", () => {
          conv.messages.pop();
          generate(conv);
        });
        foot.append(retry);
      }
      kids.push(foot);
    }
    node.replaceChildren(...kids);
  }

  function metaText(msg) {
    if (msg.role !== "assistant" || msg.state === "streaming") return "";
    const m = msg.meta || {};
    const parts = [];
    if (m.tokens) parts.push(`${m.tokens} token${m.tokens === 1 ? "" : "s"}`);
    if (m.tokensPerSecond) parts.push(`${m.tokensPerSecond.toFixed(1)} tok/s`);
    if (msg.state === "stopped") parts.push("stopped");
    if (m.finish === "length") parts.push("cut off at the token limit");
    return parts.join(" \u00b7 ");
  }

  const pendingPaint = new Map(); // message -> its conversation, repainted on the next frame
  function paintSoon(conv, msg) {
    const first = pendingPaint.size === 0;
    pendingPaint.set(msg, conv);
    if (!first) return;
    requestAnimationFrame(() => {
      const box = ui.messages;
      const stick = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
      for (const [m, c] of pendingPaint) {
        const node = msgNodes.get(m);
        if (node) fillMessage(c, m, node);
      }
      pendingPaint.clear();
      if (stick) box.scrollTop = box.scrollHeight;
    });
  }

  function renderComposer() {
    const busy = !!state.busy;
    ui.send.hidden = busy;
    ui.stop.hidden = !busy;
    ui.send.disabled = !state.models.length;
  }

  // -- banner -----------------------------------------------------------------------------------------

  let bannerRetry = null;
  function showBanner(text, retry) {
    ui.bannerText.textContent = text;
    bannerRetry = retry || null;
    ui.bannerRetry.hidden = !retry;
    ui.banner.hidden = false;
  }

  function hideBanner() {
    ui.banner.hidden = true;
    bannerRetry = null;
  }

  // -- sending and streaming --------------------------------------------------------------------------

  function requestBody(conv) {
    const s = state.settings;
    const messages = [];
    if (s.system.trim()) messages.push({ role: "system", content: s.system });
    for (const m of conv.messages) {
      if (m.state === "streaming" || (m.role === "assistant" && !m.content.trim())) continue;
      messages.push({ role: m.role, content: m.content });
    }
    const body = { model: ui.model.value, messages, stream: true, stream_options: { include_usage: true } };
    if (s.temperature !== null) body.temperature = s.temperature;
    if (s.top_p !== null) body.top_p = s.top_p;
    if (s.max_tokens !== null) body.max_tokens = s.max_tokens;
    return body;
  }

  function send() {
    const text = ui.input.value;
    if (!text.trim() || state.busy) return;
    if (!state.models.length) {
      showBanner("No model to talk to yet: the model list could not be loaded.", loadModels);
      return;
    }
    const conv = activeConv() || newConversation();
    conv.messages.push({ role: "user", content: text, state: "done", meta: {} });
    if (!conv.renamed && conv.messages.length === 1) {
      const flat = text.trim().replace(/\s+/g, " ");
      conv.title = flat.length > 48 ? flat.slice(0, 47) + "\u2026" : flat;
    }
    ui.input.value = "";
    autoGrow();
    generate(conv);
  }

  async function generate(conv) {
    const msg = { role: "assistant", content: "", state: "streaming", meta: { model: ui.model.value } };
    const body = requestBody(conv);
    conv.messages.push(msg);
    conv.updated = Date.now();
    const controller = new AbortController();
    state.busy = { convId: conv.id, msg, controller };
    saveConversations();
    if (conv.id === state.activeId) renderAll();
    else renderSidebar();
    const t0 = performance.now();
    let tFirst = null;
    let tLast = null;
    let pieces = 0;
    try {
      const res = await api("v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      msg.meta.requestId = res.headers.get("X-Request-Id") || undefined;
      if (!res.ok) throw new RequestError(await errorMessage(res));
      for await (const event of sseEvents(res, controller.signal)) {
        if (event.error) {
          const e = event.error;
          throw new RequestError(`The server stopped the answer: ${typeof e === "string" ? e : e.message}`);
        }
        if (event.usage) msg.meta.tokens = event.usage.completion_tokens;
        const choice = event.choices && event.choices[0];
        if (!choice) continue;
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          tLast = performance.now();
          if (tFirst === null) tFirst = tLast;
          pieces++;
          msg.content += piece;
          paintSoon(conv, msg);
          saveConversations(true);
        }
        if (choice.finish_reason) msg.meta.finish = choice.finish_reason;
      }
      msg.state = "done";
    } catch (err) {
      if (err.name === "AbortError") {
        msg.state = "stopped";
      } else {
        msg.state = "error";
        msg.error = err instanceof RequestError ? err.message
          : (err instanceof TypeError ? "The connection to the server was lost before the answer was complete."
            : `The request failed: ${err.message || err}`);
      }
    } finally {
      if (!msg.meta.tokens && pieces) msg.meta.tokens = pieces;
      if (tFirst !== null && tLast > tFirst && pieces > 1) {
        msg.meta.tokensPerSecond = (pieces - 1) / ((tLast - tFirst) / 1000);
      }
      msg.meta.seconds = (performance.now() - t0) / 1000;
      state.busy = null;
      conv.updated = Date.now();
      renderComposer();
      if (state.convs.includes(conv)) { // not deleted meanwhile
        saveConversations();
        paintSoon(conv, msg);
        if (conv.id === state.activeId && document.activeElement === document.body) ui.input.focus();
      }
    }
  }

  // the JSON objects of a server-sent-event stream ("data: {...}" lines), until "data: [DONE]"
  async function* sseEvents(res, signal) {
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
          const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:"))
            .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
          if (!data) continue;
          if (data === "[DONE]") return;
          let event;
          try {
            event = JSON.parse(data);
          } catch {
            throw new RequestError("The server sent a malformed stream event.");
          }
          yield event;
        }
      }
      if (signal.aborted) throw new DOMException("aborted", "AbortError");
      throw new RequestError("The server ended the answer without finishing it (the stream was cut off).");
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  function stop() {
    if (state.busy) state.busy.controller.abort();
  }

  // -- settings dialog ----------------------------------------------------------------------------------

  function openSettings() {
    const s = state.settings;
    const show = (v) => (v === null ? "" : String(v));
    ui.setTemperature.value = show(s.temperature);
    ui.setTopP.value = show(s.top_p);
    ui.setMaxTokens.value = show(s.max_tokens);
    ui.setSystem.value = s.system;
    ui.settingsError.hidden = true;
    ui.settings.showModal();
    ui.setTemperature.focus();
  }

  function readNumber(input, name, lo, hi, integer) {
    const raw = input.value.trim();
    if (!raw) return null;
    const v = Number(raw);
    if (!Number.isFinite(v) || v < lo || (hi !== null && v > hi) || (integer && !Number.isInteger(v))) {
      const range = hi === null ? `at least ${lo}` : `between ${lo} and ${hi}`;
      throw new Error(`${name} must be ${integer ? "a whole number " : "a number "}${range}, or empty.`);
    }
    return v;
  }

  function saveSettings(e) {
    e.preventDefault();
    try {
      state.settings = {
        temperature: readNumber(ui.setTemperature, "Temperature", 0, 2, false),
        top_p: readNumber(ui.setTopP, "Top-p", 0, 1, false),
        max_tokens: readNumber(ui.setMaxTokens, "Max tokens", 1, null, true),
        system: ui.setSystem.value,
      };
    } catch (err) {
      ui.settingsError.textContent = err.message;
      ui.settingsError.hidden = false;
      return;
    }
    storageSet(KEYS.settings, state.settings);
    ui.settings.close();
    ui.input.focus();
  }

  // -- layout: the sidebar as a drawer on narrow screens -------------------------------------------------

  function openSidebar() {
    ui.sidebar.classList.add("open");
    ui.scrim.hidden = false;
    ui.menuBtn.setAttribute("aria-expanded", "true");
    ui.newChat.focus();
  }

  function closeSidebar() {
    if (!ui.sidebar.classList.contains("open")) return;
    ui.sidebar.classList.remove("open");
    ui.scrim.hidden = true;
    ui.menuBtn.setAttribute("aria-expanded", "false");
  }

  function autoGrow() {
    ui.input.style.height = "auto";
    ui.input.style.height = `${Math.min(ui.input.scrollHeight, 240)}px`;
  }

  // -- wiring -------------------------------------------------------------------------------------------

  function init() {
    loadSettings();
    loadConversations();
    saveConversations(); // stores answers found cut off as "stopped"

    ui.composer.addEventListener("submit", (e) => {
      e.preventDefault();
      send();
    });
    ui.input.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing && !e.altKey && !e.ctrlKey && !e.metaKey) {
        e.preventDefault();
        send();
      }
    });
    ui.input.addEventListener("input", autoGrow);
    ui.stop.addEventListener("click", () => {
      stop();
      ui.input.focus();
    });
    document.addEventListener("keydown", (e) => {
      if (e.key !== "Escape" || ui.settings.open || ui.keyDialog.open) return;
      if (state.busy) stop();
      else closeSidebar();
    });
    ui.newChat.addEventListener("click", () => {
      const conv = activeConv();
      if (!conv || conv.messages.length) newConversation();
      saveConversations();
      renderAll();
      closeSidebar();
      ui.input.focus();
    });
    ui.model.addEventListener("change", () => storageSet(KEYS.model, ui.model.value));
    ui.settingsBtn.addEventListener("click", openSettings);
    ui.settingsForm.addEventListener("submit", saveSettings);
    ui.settingsCancel.addEventListener("click", () => ui.settings.close());
    ui.settingsReset.addEventListener("click", () => {
      ui.setTemperature.value = ui.setTopP.value = ui.setMaxTokens.value = ui.setSystem.value = "";
    });
    ui.menuBtn.addEventListener("click", () => (ui.sidebar.classList.contains("open") ? closeSidebar() : openSidebar()));
    ui.scrim.addEventListener("click", closeSidebar);
    ui.bannerRetry.addEventListener("click", () => { if (bannerRetry) bannerRetry(); });
    ui.bannerClose.addEventListener("click", hideBanner);
    window.addEventListener("storage", (e) => {
      // another tab changed the conversations: follow it unless an answer is streaming here
      if (e.key === KEYS.convs && !state.busy) {
        const mine = state.activeId;
        loadConversations();
        if (state.convs.some((c) => c.id === mine)) state.activeId = mine;
        renderAll();
      }
    });

    renderAll();
    loadModels();
    ui.input.focus();
  }

  init();
})();
