// pipx-llama's chat page: talks to this server's OpenAI-compatible API (streaming), keeps
// conversations in localStorage, and renders the model's Markdown with markdown-it (raw HTML off),
// highlight.js and KaTeX, through DOMPurify. The vendored libraries are loaded before this file
// (index.html); nothing is fetched from anywhere but this server.
"use strict";

(() => {
  const KEYS = {
    convs: "pipx-llama.conversations",
    active: "pipx-llama.active",
    settings: "pipx-llama.settings",
    model: "pipx-llama.model",
    apiKey: "pipx-llama.apiKey",
  };
  // every sampler option the API takes: the request field, its input, and the values the server accepts
  // (lo and hi inclusive; `above`: strictly greater than lo)
  const SAMPLER_FIELDS = [
    { key: "temperature", id: "set-temperature", name: "Temperature", lo: 0, hi: 2 },
    { key: "top_k", id: "set-top-k", name: "Top-k", lo: 0, hi: null, integer: true },
    { key: "top_p", id: "set-top-p", name: "Top-p", lo: 0, hi: 1 },
    { key: "min_p", id: "set-min-p", name: "Min-p", lo: 0, hi: 1 },
    { key: "repeat_penalty", id: "set-repeat-penalty", name: "Repeat penalty", lo: 0, hi: null, above: true },
    { key: "repeat_last_n", id: "set-repeat-last-n", name: "Repeat window", lo: -1, hi: null, integer: true },
    { key: "presence_penalty", id: "set-presence-penalty", name: "Presence penalty", lo: -2, hi: 2 },
    { key: "frequency_penalty", id: "set-frequency-penalty", name: "Frequency penalty", lo: -2, hi: 2 },
    { key: "max_tokens", id: "set-max-tokens", name: "Max tokens", lo: 1, hi: null, integer: true },
    { key: "seed", id: "set-seed", name: "Seed", lo: null, hi: null, integer: true },
  ];
  const UNSET_DEFAULT = { max_tokens: "no limit", seed: "random" }; // what a null server default means
  const EXPORT_FORMAT = "pipx-llama.conversation";

  const $ = (id) => document.getElementById(id);
  const ui = {
    sidebar: $("sidebar"), scrim: $("scrim"), menuBtn: $("menu-btn"), newChat: $("new-chat"),
    convSearch: $("conv-search"), convList: $("conv-list"), convNone: $("conv-none"),
    importBtn: $("import-btn"), importFile: $("import-file"),
    title: $("conv-title"), model: $("model"), exportBtn: $("export-btn"), settingsBtn: $("settings-btn"),
    banner: $("banner"), bannerText: $("banner-text"), bannerRetry: $("banner-retry"),
    bannerClose: $("banner-close"), messages: $("messages"), empty: $("empty"), composer: $("composer"),
    input: $("input"), send: $("send"), stop: $("stop"), status: $("status"),
    settings: $("settings"), settingsForm: $("settings-form"), settingsError: $("settings-error"),
    setSystem: $("set-system"), settingsReset: $("settings-reset"), settingsCancel: $("settings-cancel"),
    exportDialog: $("export-dialog"), exportJson: $("export-json"), exportMd: $("export-md"),
    exportCancel: $("export-cancel"),
    keyDialog: $("key-dialog"), keyForm: $("key-form"), keyInput: $("key-input"), keyError: $("key-error"),
    keyCancel: $("key-cancel"),
  };

  const state = {
    convs: [],        // [{id, title, renamed, created, updated, messages: [{role, content, state, meta, error}]}]
    activeId: null,
    settings: emptySettings(),
    defaults: null,   // the server's sampler defaults (GET /props), once known
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

  function emptySettings() {
    const s = { system: "" };
    for (const { key } of SAMPLER_FIELDS) s[key] = null; // null: the server's default
    return s;
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

  function announce(text) {
    ui.status.textContent = "";
    requestAnimationFrame(() => { ui.status.textContent = text; }); // a change, so it is read again
  }

  // -- Markdown ----------------------------------------------------------------------------------------
  // markdown-it makes HTML from the model's text with raw HTML turned off (so "<script>" stays text) and
  // only http(s)/mailto links; DOMPurify then cleans that HTML again before it becomes DOM nodes, so a
  // bug in any library on the way cannot put live markup on the page. Formulas leave markdown-it as
  // placeholders holding their TeX as text; KaTeX fills them in with DOM nodes afterwards, because its
  // HTML string output carries inline styles, which the page's CSP (style-src 'self') refuses.

  const md = window.markdownit({ html: false, linkify: true, breaks: true, highlight: highlightCode });
  md.linkify.set({ fuzzyLink: false, fuzzyEmail: false }); // only text that is plainly a URL becomes a link
  md.disable("image"); // a picture would be fetched from another site; ![x](url) stays text and a link
  // the answer's headings sit below the page's own (h1) and the dialogs' (h2): "#" becomes h3
  md.core.ruler.push("shift_headings", (st) => {
    for (const t of st.tokens) {
      if (t.type === "heading_open" || t.type === "heading_close") {
        t.tag = `h${Math.min(Number(t.tag[1]) + 2, 6)}`;
      }
    }
  });
  // a table column's alignment as a class: markdown-it writes it as an inline style, which the CSP refuses
  for (const rule of ["th_open", "td_open"]) {
    md.renderer.rules[rule] = (tokens, idx, options, env, self) => {
      const token = tokens[idx];
      const align = /text-align:\s*(left|center|right)/.exec(token.attrGet("style") || "");
      token.attrs = (token.attrs || []).filter(([name]) => name !== "style");
      if (align) token.attrJoin("class", `align-${align[1]}`);
      return self.renderToken(tokens, idx, options);
    };
  }
  md.use(window.texmath, {
    delimiters: ["dollars", "brackets"],
    engine: {
      renderToString: (tex, options) =>
        `<span class="tex${options.displayMode ? " tex-display" : ""}">${md.utils.escapeHtml(tex)}</span>`,
    },
  });

  const PURIFY = {
    RETURN_DOM_FRAGMENT: true,
    ALLOWED_URI_REGEXP: /^(?:https?|mailto):/i, // relative links would point into this server's API
    FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "img", "picture", "video",
      "audio", "iframe", "object", "embed"],
    FORBID_ATTR: ["style", "id", "name"], // no inline styles (CSP), no ids that could shadow the page's
  };
  window.DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.nodeName === "A" && node.hasAttribute("href")) {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer");
    }
  });

  const KATEX = { throwOnError: false, trust: false, strict: "ignore", maxSize: 50, maxExpand: 1000 };
  const texCache = new Map(); // "D"/"I" + TeX -> a rendered node to clone: streaming repaints reuse it

  function highlightCode(code, lang) {
    const name = (lang || "").toLowerCase();
    if (name && window.hljs.getLanguage(name)) {
      try {
        return window.hljs.highlight(code, { language: name, ignoreIllegals: true }).value;
      } catch {
        // shown plain below
      }
    }
    return ""; // markdown-it escapes the code itself
  }

  function renderTex(placeholder) {
    const display = placeholder.classList.contains("tex-display");
    const tex = placeholder.textContent;
    const key = (display ? "D" : "I") + tex;
    let done = texCache.get(key);
    if (!done) {
      done = el(display ? "div" : "span", { class: "math" });
      try {
        window.katex.render(tex, done, { ...KATEX, displayMode: display });
      } catch (err) {
        const why = String(err.message || err);
        done.replaceChildren(el("code", { class: "tex-error", text: tex, title: why }));
      }
      texCache.set(key, done);
      if (texCache.size > 500) texCache.delete(texCache.keys().next().value);
    }
    placeholder.replaceWith(done.cloneNode(true));
  }

  function codeBlock(pre) {
    const code = pre.querySelector("code");
    const lang = code && /\blanguage-(\S+)/.exec(code.className);
    if (code) code.classList.add("hljs");
    const copy = el("button", { type: "button", class: "btn btn-small copy", text: "Copy",
      "aria-label": `Copy the ${lang ? lang[1] + " " : ""}code` });
    const box = el("div", { class: "code" },
      el("div", { class: "code-head" },
        el("span", { class: "code-lang", text: lang ? lang[1] : "code" }), copy));
    pre.replaceWith(box);
    box.append(pre);
  }

  // HTML from markdown-it -> clean DOM nodes, with code blocks, tables and formulas finished
  function toNodes(html) {
    const frag = window.DOMPurify.sanitize(html, PURIFY);
    for (const a of frag.querySelectorAll("a:not([href])")) a.replaceWith(...a.childNodes);
    for (const pre of frag.querySelectorAll("pre")) codeBlock(pre);
    for (const table of frag.querySelectorAll("table")) {
      const wrap = el("div", { class: "table-wrap" });
      table.replaceWith(wrap);
      wrap.append(table);
    }
    for (const tex of frag.querySelectorAll(".tex")) renderTex(tex);
    return [...frag.childNodes];
  }

  // The text's top-level blocks as [first token, end token) ranges, each with a key that changes
  // whenever its source lines or kind do. A streaming answer is parsed whole on each paint (cheap) but
  // only the blocks that changed (in practice the last one) are rendered, highlighted, typeset and
  // sanitized again, so that work stays the same however long the answer grows.
  function topBlocks(tokens, lines) {
    const blocks = [];
    let start = 0;
    let depth = 0;
    for (let i = 0; i < tokens.length; i++) {
      depth += tokens[i].nesting;
      if (depth === 0) {
        const map = tokens[start].map;
        blocks.push({ from: start, to: i + 1,
          key: map ? `${tokens[start].type}\u0000${lines.slice(map[0], map[1]).join("\n")}` : null });
        start = i + 1;
      }
    }
    return blocks;
  }

  // Render `text` into `body`. With `cache` (an array the caller keeps between calls) only the blocks
  // that changed are rebuilt; without it, or when the text defines link references (which reach back
  // into earlier blocks), everything is.
  function renderMarkdown(body, text, cache) {
    const env = {};
    const tokens = md.parse(String(text), env);
    if (!cache || (env.references && Object.keys(env.references).length)) {
      body.replaceChildren(...toNodes(md.renderer.render(tokens, md.options, env)));
      if (cache) cache.splice(0, cache.length, { key: null, nodes: [...body.childNodes] });
      return;
    }
    if (!cache.length) body.replaceChildren();
    const blocks = topBlocks(tokens, String(text).split("\n"));
    let same = 0;
    while (same < cache.length && same < blocks.length && cache[same].key !== null
           && cache[same].key === blocks[same].key) same++;
    for (const old of cache.splice(same)) for (const n of old.nodes) n.remove();
    for (const b of blocks.slice(same)) {
      const nodes = toNodes(md.renderer.render(tokens.slice(b.from, b.to), md.options, env));
      body.append(...nodes);
      cache.push({ key: b.key, nodes });
    }
  }

  // -- clipboard and files -------------------------------------------------------------------------------

  async function copyText(text) {
    try {
      if (!navigator.clipboard) throw new Error("no clipboard");
      await navigator.clipboard.writeText(text);
      return true;
    } catch {
      // pages served over plain http from another machine get no clipboard API
      const focused = document.activeElement;
      const area = el("textarea", { value: text, readOnly: true, class: "offscreen", "aria-hidden": "true" });
      document.body.append(area);
      area.select();
      let ok = false;
      try {
        ok = document.execCommand("copy");
      } catch {
        ok = false;
      }
      area.remove();
      if (focused && focused.focus) focused.focus();
      return ok;
    }
  }

  async function copyWithFeedback(text, button, label) {
    const ok = await copyText(text);
    button.textContent = ok ? "Copied" : "Copy failed";
    announce(ok ? "Copied to the clipboard." : "The browser did not allow copying.");
    setTimeout(() => { button.textContent = label; }, 1500);
  }

  function download(name, text, type) {
    const url = URL.createObjectURL(new Blob([text], { type }));
    const a = el("a", { href: url, download: name, class: "offscreen" });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10_000);
  }

  function fileName(title, ext) {
    const slug = title.toLowerCase().replace(/[^\p{L}\p{N}]+/gu, "-").replace(/^-+|-+$/g, "").slice(0, 60);
    return `${slug || "conversation"}.${ext}`;
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

  // a conversation as stored or imported, checked field by field; null when it is not one
  function cleanConversation(c) {
    if (!c || typeof c !== "object" || !Array.isArray(c.messages)) return null;
    return {
      id: typeof c.id === "string" && c.id ? c.id : newId(),
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
    };
  }

  function loadConversations() {
    const raw = storageGet(KEYS.convs, []);
    state.convs = (Array.isArray(raw) ? raw : []).filter((c) => c && typeof c.id === "string")
      .map(cleanConversation).filter(Boolean);
    const active = storageGet(KEYS.active, null);
    state.activeId = state.convs.some((c) => c.id === active) ? active : null;
  }

  // soon: within half a second, however often it is asked for (a streaming answer asks per token)
  let saveTimer = null;
  function saveConversations(soon = false) {
    if (soon) {
      if (saveTimer === null) saveTimer = setTimeout(() => saveConversations(false), 500);
      return;
    }
    clearTimeout(saveTimer);
    saveTimer = null;
    storageSet(KEYS.convs, state.convs);
    storageSet(KEYS.active, state.activeId);
  }

  function loadSettings() {
    const s = storageGet(KEYS.settings, {}) || {};
    const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);
    state.settings = emptySettings();
    for (const { key } of SAMPLER_FIELDS) state.settings[key] = num(s[key]);
    state.settings.system = typeof s.system === "string" ? s.system : "";
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

  async function loadDefaults() {
    try {
      const res = await api("props");
      if (!res.ok) return;
      const body = await res.json();
      const params = body && body.default_generation_settings && body.default_generation_settings.params;
      if (params && typeof params === "object") state.defaults = params;
    } catch {
      // the settings then say "server default" without the value
    }
    showDefaults();
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

  function titleFrom(text) {
    const flat = text.trim().replace(/\s+/g, " ");
    return flat.length > 48 ? flat.slice(0, 47) + "\u2026" : flat;
  }

  function exportJson(conv) {
    const { title, created, updated, messages } = conv;
    const data = { format: EXPORT_FORMAT, version: 1, exported: new Date().toISOString(),
      conversation: { title, created, updated, messages } };
    download(fileName(conv.title, "json"), JSON.stringify(data, null, 2) + "\n", "application/json");
  }

  function exportMarkdown(conv) {
    const parts = [`# ${conv.title}`];
    for (const m of conv.messages) {
      const who = m.role === "user" ? "You" : (m.meta.model || "Assistant");
      parts.push(`## ${who}`, m.content + (m.state === "stopped" ? "\n\n*(stopped)*" : ""));
    }
    download(fileName(conv.title, "md"), parts.join("\n\n") + "\n", "text/markdown");
  }

  // An export of this page (one conversation, or a list of them), or any object with a `messages`
  // list of {role, content}; imported conversations always get new ids, so nothing is overwritten.
  function importConversations(data) {
    const items = Array.isArray(data) ? data : [data];
    const convs = items.map((item) => cleanConversation(item && item.format === EXPORT_FORMAT
      ? item.conversation : item)).filter((c) => c && c.messages.length);
    if (!convs.length) {
      throw new Error("it holds no conversation (expected a JSON export of this page, or an object with " +
        "a \"messages\" list of {role, content})");
    }
    for (const conv of convs) {
      conv.id = newId();
      if (conv.title === "New chat") conv.title = titleFrom(conv.messages[0].content) || "Imported chat";
      conv.renamed = true;
      conv.updated = Date.now();
      state.convs.push(conv);
    }
    state.activeId = convs[convs.length - 1].id;
    saveConversations();
    renderAll();
    return convs.length;
  }

  async function importFile(file) {
    try {
      const text = await file.text();
      let data;
      try {
        data = JSON.parse(text);
      } catch (err) {
        throw new Error(`it is not JSON (${err.message})`);
      }
      const n = importConversations(data);
      hideBanner();
      announce(`Imported ${n} conversation${n === 1 ? "" : "s"}.`);
      closeSidebar();
    } catch (err) {
      showBanner(`Could not import ${file.name}: ${err.message}.`);
    }
  }

  // -- messages: copy, regenerate, edit and resend, delete ------------------------------------------------

  function busyHere(conv) {
    return !!state.busy && state.busy.convId === conv.id;
  }

  // one answer is generated at a time: asking for another says so instead of losing the request
  function modelFree() {
    if (state.busy) announce("Another answer is still being written: wait for it, or stop it (Esc).");
    return !state.busy;
  }

  function regenerate(conv) {
    const last = conv.messages[conv.messages.length - 1];
    if (!modelFree() || !last || last.role !== "assistant") return;
    conv.messages.pop();
    generate(conv);
  }

  function deleteMessage(conv, msg) {
    if (busyHere(conv)) return;
    if (!window.confirm(msg.role === "user" ? "Delete this message?" : "Delete this answer?")) return;
    conv.messages = conv.messages.filter((m) => m !== msg);
    conv.updated = Date.now();
    saveConversations();
    renderAll();
    ui.input.focus();
  }

  function startEdit(conv, msg, node) {
    if (!modelFree()) return;
    const area = el("textarea", { class: "edit-input", value: msg.content, rows: 3,
      "aria-label": "Edit your message; Enter sends it, Esc cancels" });
    const cancel = el("button", { type: "button", class: "btn btn-small edit-cancel", text: "Cancel" });
    const save = el("button", { type: "button", class: "btn btn-small btn-primary edit-send", text: "Send" });
    const box = el("div", { class: "edit" }, area, el("div", { class: "edit-buttons" }, cancel, save));
    const close = () => {
      fillMessage(conv, msg, node);
      const again = node.querySelector(".act-edit");
      if (again) again.focus();
    };
    const submit = () => {
      const text = area.value;
      if (!text.trim() || !modelFree()) return;
      const at = conv.messages.indexOf(msg);
      if (at < 0) return;
      msg.content = text;
      conv.messages.splice(at + 1); // the later turns answered the old text
      if (at === 0 && !conv.renamed) conv.title = titleFrom(text);
      generate(conv);
      ui.input.focus();
    };
    area.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing && !e.altKey && !e.ctrlKey && !e.metaKey) {
        e.preventDefault();
        submit();
      } else if (e.key === "Escape") {
        e.preventDefault();
        e.stopPropagation();
        close();
      }
    });
    cancel.addEventListener("click", close);
    save.addEventListener("click", submit);
    node.replaceChildren(node.querySelector(".msg-role"), box);
    area.style.height = `${Math.min(Math.max(area.scrollHeight, 80), 400)}px`;
    area.focus();
    area.setSelectionRange(area.value.length, area.value.length);
  }

  function lastAnswer(conv) {
    for (let i = conv.messages.length - 1; i >= 0; i--) {
      const m = conv.messages[i];
      if (m.role === "assistant" && m.content) return m;
    }
    return null;
  }

  // -- rendering --------------------------------------------------------------------------------------

  function renderAll() {
    renderSidebar();
    renderConversation();
    renderComposer();
  }

  function matches(conv, query) {
    if (!query) return true;
    const q = query.toLocaleLowerCase();
    return conv.title.toLocaleLowerCase().includes(q)
      || conv.messages.some((m) => m.content.toLocaleLowerCase().includes(q));
  }

  function renderSidebar() {
    const query = ui.convSearch.value.trim();
    const shown = [...state.convs].filter((c) => matches(c, query)).sort((a, b) => b.updated - a.updated);
    const items = shown.map((conv) => {
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
    ui.convNone.hidden = !query || items.length > 0;
  }

  function renderModels() {
    const saved = storageGet(KEYS.model, null);
    const current = ui.model.value || saved;
    ui.model.replaceChildren(...state.models.map((id) => el("option", { value: id, text: id, title: id })));
    if (state.models.includes(current)) ui.model.value = current;
    ui.model.disabled = !state.models.length;
    ui.model.title = ui.model.value || "Model";
    renderComposer();
  }

  function renderConversation() {
    const conv = activeConv();
    ui.title.textContent = conv ? conv.title : "New chat";
    document.title = conv ? `${conv.title} · pipx-llama` : "pipx-llama chat";
    ui.exportBtn.disabled = !conv || !conv.messages.length;
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

  // needs: "model" (the action asks for an answer), "conversation" (it changes the messages), or null
  function actionButton(cls, text, label, onClick, needs) {
    const b = el("button", { type: "button", class: `btn-link ${cls}`, text, "aria-label": label });
    if (needs) b.dataset.needs = needs;
    b.addEventListener("click", onClick);
    return b;
  }

  function actionBlocked(button, conv) {
    return button.dataset.needs === "model" ? !!state.busy : busyHere(conv);
  }

  function messageActions(conv, msg, node) {
    const isLast = conv.messages[conv.messages.length - 1] === msg;
    const who = msg.role === "user" ? "message" : "answer";
    const acts = [];
    const copy = actionButton("act-copy", "Copy", `Copy this ${who} (Markdown)`,
      () => copyWithFeedback(msg.content, copy, "Copy"), null);
    if (msg.content) acts.push(copy);
    if (msg.role === "user") {
      acts.push(actionButton("act-edit", "Edit", "Edit this message and send it again",
        () => startEdit(conv, msg, node), "model"));
    } else if (isLast) {
      const retry = msg.state === "error";
      acts.push(actionButton("act-regen", retry ? "Retry" : "Regenerate",
        retry ? "Ask for this answer again" : "Answer again", () => regenerate(conv), "model"));
    }
    acts.push(actionButton("act-delete", "Delete", `Delete this ${who}`,
      () => deleteMessage(conv, msg), "conversation"));
    for (const b of acts) if (b.dataset.needs) b.disabled = actionBlocked(b, conv);
    return el("span", { class: "msg-actions" }, ...acts);
  }

  // The whole message. While an answer streams only its body is repainted (paint); when it ends, the
  // body built block by block is kept and brought up to date the same way (a full render of a long
  // answer would cost a visible pause just as it completes).
  function fillMessage(conv, msg, node) {
    const streaming = msg.state === "streaming";
    node.dataset.state = msg.state || "done";
    node.setAttribute("aria-busy", streaming ? "true" : "false");
    if (msg.meta && msg.meta.requestId) node.dataset.requestId = msg.meta.requestId;
    let body = node.mdCache && node.querySelector(".msg-body");
    const kept = !!body && msg.role === "assistant" && !!msg.content;
    if (kept) {
      renderMarkdown(body, msg.content, node.mdCache);
    } else {
      body = el("div", { class: "msg-body" });
      node.mdCache = null;
      if (msg.role === "user") {
        body.classList.add("plain");
        body.textContent = msg.content;
      } else if (streaming && !msg.content) {
        body.append(el("span", { class: "thinking", text: "Thinking\u2026" }));
        node.mdCache = [];
      } else if (streaming) {
        node.mdCache = [];
        renderMarkdown(body, msg.content, node.mdCache);
      } else {
        renderMarkdown(body, msg.content, null);
      }
    }
    if (!streaming) node.mdCache = null;
    const after = [];
    if (msg.error) after.push(el("p", { class: "error-text msg-error", role: "alert", text: msg.error }));
    if (!streaming) {
      after.push(el("div", { class: "msg-foot" }, el("span", { class: "msg-meta", text: metaText(msg) }),
        messageActions(conv, msg, node)));
    }
    if (kept) { // the body stays where it is: moving it would lay all of it out again
      while (body.nextSibling) body.nextSibling.remove();
      node.append(...after);
    } else {
      const who = msg.role === "user" ? "You" : (msg.meta.model || "Assistant");
      const role = el("div", { class: "msg-role", text: who });
      node.replaceChildren(role, body, ...after);
    }
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

  function setActionsEnabled() {
    const conv = activeConv();
    if (!conv) return;
    for (const b of ui.messages.querySelectorAll(".msg-actions [data-needs]")) b.disabled = actionBlocked(b, conv);
  }

  // Repaints wait for the next animation frame, and after an expensive one for as long again as it
  // took, so rendering never takes more than about half of the page's time: typing stays responsive
  // however long the answer grows.
  const pendingPaint = new Map(); // message -> its conversation
  let paintQueued = false;
  let paintCost = 0;
  let paintEnd = 0;
  function paintSoon(conv, msg) {
    pendingPaint.set(msg, conv);
    if (paintQueued) return;
    paintQueued = true;
    const wait = paintEnd + paintCost - performance.now();
    if (wait > 4) setTimeout(() => requestAnimationFrame(paint), wait);
    else requestAnimationFrame(paint);
  }

  function paint() {
    const t0 = performance.now();
    paintQueued = false;
    const box = ui.messages;
    const stick = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
    for (const [m, c] of pendingPaint) {
      const node = msgNodes.get(m);
      if (!node) continue;
      if (m.state === "streaming" && node.mdCache) {
        renderMarkdown(node.querySelector(".msg-body"), m.content, node.mdCache);
      } else {
        fillMessage(c, m, node);
      }
    }
    pendingPaint.clear();
    if (stick) box.scrollTop = box.scrollHeight;
    paintEnd = performance.now();
    paintCost = paintEnd - t0;
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
    for (const { key } of SAMPLER_FIELDS) if (s[key] !== null) body[key] = s[key];
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
    if (!conv.renamed && conv.messages.length === 1) conv.title = titleFrom(text);
    ui.input.value = "";
    autoGrow();
    generate(conv);
  }

  async function generate(conv) {
    if (state.busy) return;
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
        setActionsEnabled();
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

  function defaultText(key) {
    const d = state.defaults;
    if (!d || !(key in d)) return "server default";
    const v = d[key];
    return v === null || v === undefined ? (UNSET_DEFAULT[key] || "server default") : String(v);
  }

  function showDefaults() {
    for (const { key, id } of SAMPLER_FIELDS) {
      const input = $(id);
      input.placeholder = defaultText(key);
      input.title = `Server default: ${defaultText(key)}`;
    }
  }

  function openSettings() {
    const s = state.settings;
    for (const { key, id } of SAMPLER_FIELDS) $(id).value = s[key] === null ? "" : String(s[key]);
    ui.setSystem.value = s.system;
    ui.settingsError.hidden = true;
    showDefaults();
    ui.settings.showModal();
    $(SAMPLER_FIELDS[0].id).focus();
  }

  function readNumber({ id, name, lo, hi, integer, above }) {
    const raw = $(id).value.trim();
    if (!raw) return null;
    const v = Number(raw);
    const low = lo !== null && (above ? v <= lo : v < lo);
    if (!Number.isFinite(v) || low || (hi !== null && v > hi) || (integer && !Number.isSafeInteger(v))) {
      let range = "";
      if (hi !== null) range = ` between ${lo} and ${hi}`;
      else if (lo !== null) range = above ? ` above ${lo}` : ` of at least ${lo}`;
      throw new Error(`${name} must be ${integer ? "a whole number" : "a number"}${range}, or empty.`);
    }
    return v;
  }

  function saveSettings(e) {
    e.preventDefault();
    const next = { system: ui.setSystem.value };
    try {
      for (const field of SAMPLER_FIELDS) next[field.key] = readNumber(field);
    } catch (err) {
      ui.settingsError.textContent = err.message;
      ui.settingsError.hidden = false;
      return;
    }
    state.settings = next;
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

  function onKey(e) {
    if (ui.settings.open || ui.keyDialog.open || ui.exportDialog.open) return;
    if (e.key === "Escape") {
      if (state.busy) stop();
      else closeSidebar();
    } else if ((e.ctrlKey || e.metaKey) && e.shiftKey && !e.altKey && e.code === "KeyC") {
      e.preventDefault();
      const conv = activeConv();
      const answer = conv && lastAnswer(conv);
      if (!answer) {
        announce("There is no answer to copy yet.");
        return;
      }
      copyText(answer.content)
        .then((ok) => announce(ok ? "Copied the last answer." : "The browser did not allow copying."));
    }
  }

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
    document.addEventListener("keydown", onKey);
    ui.messages.addEventListener("click", (e) => {
      const button = e.target.closest(".code .copy");
      if (button) copyWithFeedback(button.closest(".code").querySelector("pre").textContent, button, "Copy");
    });
    ui.newChat.addEventListener("click", () => {
      const conv = activeConv();
      if (!conv || conv.messages.length) newConversation();
      saveConversations();
      renderAll();
      closeSidebar();
      ui.input.focus();
    });
    ui.convSearch.addEventListener("input", renderSidebar);
    ui.convSearch.addEventListener("keydown", (e) => {
      if (e.key === "Escape" && ui.convSearch.value) {
        e.stopPropagation();
        ui.convSearch.value = "";
        renderSidebar();
      }
    });
    ui.importBtn.addEventListener("click", () => ui.importFile.click());
    ui.importFile.addEventListener("change", () => {
      const file = ui.importFile.files[0];
      ui.importFile.value = "";
      if (file) importFile(file);
    });
    ui.exportBtn.addEventListener("click", () => {
      if (activeConv()) ui.exportDialog.showModal();
    });
    ui.exportCancel.addEventListener("click", () => ui.exportDialog.close());
    ui.exportJson.addEventListener("click", () => {
      ui.exportDialog.close();
      exportJson(activeConv());
    });
    ui.exportMd.addEventListener("click", () => {
      ui.exportDialog.close();
      exportMarkdown(activeConv());
    });
    ui.model.addEventListener("change", () => {
      storageSet(KEYS.model, ui.model.value);
      ui.model.title = ui.model.value;
    });
    ui.settingsBtn.addEventListener("click", openSettings);
    ui.settingsForm.addEventListener("submit", saveSettings);
    ui.settingsCancel.addEventListener("click", () => ui.settings.close());
    ui.settingsReset.addEventListener("click", () => {
      for (const { id } of SAMPLER_FIELDS) $(id).value = "";
      ui.setSystem.value = "";
      ui.settingsError.hidden = true;
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
    showDefaults();
    loadModels();
    loadDefaults();
    ui.input.focus();
  }

  init();
})();
