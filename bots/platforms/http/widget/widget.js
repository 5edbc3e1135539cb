/*
 * Parley's web chat widget. A site pastes one tag:
 *
 *   <script src="https://PARLEY/widget.js" data-parley-key="pk_…"
 *           data-parley-title="Support" async></script>
 *
 * Options (data-parley-*): key, title, mode ("launcher": a button that opens a panel,
 * the default; "page": the chat fills the page, and the key may come from #key=pk_…).
 *
 * While people answer the conversation (handed off), the widget reads the history every
 * few seconds for their replies, which any server replica can answer from Redis.
 *
 * No dependencies and no build step. The widget lives in an open shadow root, builds
 * every node with createElement/createTextNode (never from HTML strings), and renders
 * the model's Markdown the same way, so a reply can never inject markup or script.
 */
(() => {
  "use strict";

  const script =
    document.currentScript ||
    document.querySelector("script[data-parley-key]") ||
    Array.from(document.scripts).find((s) => /\/widget\.js(?:[?#].*)?$/.test(s.src));
  if (!script || script.hasAttribute("data-parley-mounted")) return;
  script.setAttribute("data-parley-mounted", "");

  const BASE = new URL(script.src, location.href).origin;
  const MODE = script.dataset.parleyMode === "page" ? "page" : "launcher";
  const TITLE = (script.dataset.parleyTitle || "").trim() || "Chat with us";
  const KEY = (script.dataset.parleyKey || (MODE === "page" ? keyFromHash() : "")).trim();
  const RETRY_MS = [500, 1000, 2000, 4000, 8000];
  const STALL_MS = 45000; // the server sends a keep-alive every 15 s
  const REFUSED = ["rate_limited", "budget_spent"];
  const LINK_REL = "noopener noreferrer nofollow ugc";
  const MAX_DEPTH = 8;
  const POLL_MS = 3000; // while handed off: how often people's replies are looked for
  const POLL_BACKOFF_MS = 15000; // after a failed look

  function keyFromHash() {
    const params = new URLSearchParams(location.hash.replace(/^#/, ""));
    return params.get("key") || "";
  }

  // ------------------------------------------------------------------- storage

  const SLOT = "parley:" + fnv1a(BASE + " " + KEY);
  const memory = new Map();
  const storage = (() => {
    try {
      const probe = "parley:probe";
      window.localStorage.setItem(probe, probe);
      window.localStorage.removeItem(probe);
      return window.localStorage;
    } catch (_) {
      return null; // storage blocked: the conversation lasts as long as the page
    }
  })();

  function fnv1a(text) {
    let hash = 0x811c9dc5;
    for (let i = 0; i < text.length; i++) {
      hash ^= text.charCodeAt(i);
      hash = Math.imul(hash, 0x01000193) >>> 0;
    }
    return hash.toString(16).padStart(8, "0");
  }

  function load(name) {
    try {
      return storage ? storage.getItem(SLOT + ":" + name) : memory.get(name) || null;
    } catch (_) {
      return memory.get(name) || null;
    }
  }

  function save(name, value) {
    try {
      if (storage && value === null) storage.removeItem(SLOT + ":" + name);
      else if (storage) storage.setItem(SLOT + ":" + name, value);
    } catch (_) {
      /* full or blocked: keep it in memory */
    }
    if (value === null) memory.delete(name);
    else memory.set(name, value);
  }

  function newConversationId() {
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes); // randomUUID is missing on insecure origins
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function storedConversation() {
    const id = load("conversation");
    return id && /^[0-9a-f]{32}$/.test(id) ? id : "";
  }

  function readPending() {
    try {
      const pending = JSON.parse(load("pending") || "null");
      return pending && typeof pending.reply === "string" && typeof pending.text === "string"
        ? pending
        : null;
    } catch (_) {
      return null;
    }
  }

  // ---------------------------------------------------------------------- DOM

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") el.className = value;
      else el.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) if (child !== null && child !== undefined) el.append(child);
    return el;
  }

  const ICONS = {
    chat: ["M21 15a2 2 0 0 1-2 2H7l-4 4V5a2 2 0 0 1 2-2h14a2 2 0 0 1 2 2z"],
    down: ["M6 9l6 6 6-6"],
    close: ["M18 6 6 18", "M6 6l12 12"],
    send: ["M12 19V5", "M5 12l7-7 7 7"],
    restart: ["M3 12a9 9 0 1 0 3-6.7L3 8", "M3 3v5h5"],
  };

  function icon(name) {
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    const attrs = {
      viewBox: "0 0 24 24",
      fill: "none",
      stroke: "currentColor",
      "stroke-width": "2",
      "stroke-linecap": "round",
      "stroke-linejoin": "round",
      "aria-hidden": "true",
      focusable: "false",
      class: "pw-icon pw-icon-" + name,
    };
    for (const [k, v] of Object.entries(attrs)) svg.setAttribute(k, v);
    for (const d of ICONS[name]) {
      const path = document.createElementNS(ns, "path");
      path.setAttribute("d", d);
      svg.append(path);
    }
    return svg;
  }

  // ----------------------------------------------------------------- Markdown
  //
  // A small renderer for what chat models write. It only ever creates elements and
  // text nodes: the input is data, never markup.

  const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)/;
  const HEADING = /^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$/;
  const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
  const QUOTE = /^ {0,3}> ?(.*)$/;
  const BULLET = /^( {0,3})([-*+])\s+(.*)$/;
  const ORDERED = /^( {0,3})(\d{1,9})([.)])\s+(.*)$/;
  const TABLE_RULE = /^\s*\|?\s*:?-+:?\s*(?:\|\s*:?-+:?\s*)*\|?\s*$/;
  const ESCAPABLE = "\\`*_{}[]()#+-.!~|<>";
  const WORD = /[\p{L}\p{N}]/u;
  const BARE_URL = /https?:\/\/[^\s<>"'`]+/iy;

  function markdown(text, depth) {
    const fragment = document.createDocumentFragment();
    blocks(String(text).replace(/\r\n?/g, "\n").split("\n"), fragment, depth || 0);
    return fragment;
  }

  function startsBlock(line) {
    return (
      FENCE.test(line) ||
      HEADING.test(line) ||
      RULE.test(line) ||
      QUOTE.test(line) ||
      BULLET.test(line) ||
      ORDERED.test(line)
    );
  }

  function blocks(lines, parent, depth) {
    let paragraph = [];
    const flush = () => {
      if (!paragraph.length) return;
      const p = h("p");
      paragraph.forEach((line, n) => {
        if (n) p.append(h("br"));
        inline(line.trim(), p, depth, false);
      });
      parent.append(p);
      paragraph = [];
    };
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let m;
      if (!line.trim()) {
        flush();
        i++;
      } else if ((m = FENCE.exec(line))) {
        flush();
        const close = new RegExp("^ {0,3}" + m[1][0] + "{" + m[1].length + ",}\\s*$");
        const body = [];
        for (i++; i < lines.length && !close.test(lines[i]); i++) body.push(lines[i]);
        i++; // the closing fence (or the end: a block still streaming in)
        const code = h("code", null, body.join("\n"));
        if (m[2]) code.setAttribute("data-lang", m[2].slice(0, 32));
        parent.append(h("pre", null, code));
      } else if ((m = HEADING.exec(line))) {
        flush();
        const heading = h(m[1].length <= 2 ? "h3" : "h4");
        inline(m[2], heading, depth, false);
        parent.append(heading);
        i++;
      } else if (RULE.test(line)) {
        flush();
        parent.append(h("hr"));
        i++;
      } else if (QUOTE.test(line)) {
        flush();
        const inner = [];
        while (i < lines.length && lines[i].trim() && (m = QUOTE.exec(lines[i]))) {
          inner.push(m[1]);
          i++;
        }
        const quote = h("blockquote");
        if (depth < MAX_DEPTH) blocks(inner, quote, depth + 1);
        else quote.append(inner.join("\n"));
        parent.append(quote);
      } else if (BULLET.test(line) || ORDERED.test(line)) {
        flush();
        i = list(lines, i, parent, depth);
      } else if (
        line.includes("|") &&
        i + 1 < lines.length &&
        lines[i + 1].includes("|") &&
        TABLE_RULE.test(lines[i + 1])
      ) {
        flush();
        i = table(lines, i, parent, depth);
      } else {
        paragraph.push(line);
        i++;
      }
    }
    flush();
  }

  function list(lines, i, parent, depth) {
    const ordered = !BULLET.test(lines[i]);
    const pattern = ordered ? ORDERED : BULLET;
    const first = pattern.exec(lines[i]);
    const el = h(ordered ? "ol" : "ul");
    if (ordered && Number(first[2]) !== 1) el.setAttribute("start", String(Number(first[2])));
    const marker = ordered ? first[3] : first[2];
    while (i < lines.length) {
      const m = pattern.exec(lines[i]);
      if (!m || RULE.test(lines[i]) || (ordered ? m[3] : m[2]) !== marker) break;
      const indent = m[1].length;
      const content = ordered ? m[4] : m[3];
      const width = lines[i].length - content.length; // where the item's text starts
      const item = [content];
      let blank = false;
      let loose = false;
      for (i++; i < lines.length; i++) {
        const line = lines[i];
        if (!line.trim()) {
          blank = true;
          continue;
        }
        const lead = line.length - line.trimStart().length;
        if (lead >= indent + 2) {
          if (blank) item.push("");
          loose = loose || blank;
          item.push(line.slice(Math.min(lead, width)));
          blank = false;
        } else if (!blank && !startsBlock(line)) {
          item.push(line.trim()); // a lazy continuation of the item's paragraph
        } else {
          break;
        }
      }
      const li = h("li");
      if (depth < MAX_DEPTH) blocks(item, li, depth + 1);
      else li.append(item.join("\n"));
      if (!loose) {
        for (const child of Array.from(li.children)) {
          if (child.tagName === "P") child.replaceWith(...child.childNodes);
        }
      }
      el.append(li);
      if (blank && !(i < lines.length && pattern.test(lines[i]))) break;
    }
    parent.append(el);
    return i;
  }

  function splitRow(line) {
    let text = line.trim();
    if (text.startsWith("|")) text = text.slice(1);
    if (text.endsWith("|") && !text.endsWith("\\|")) text = text.slice(0, -1);
    const cells = [];
    let cell = "";
    for (let i = 0; i < text.length; i++) {
      if (text[i] === "\\" && text[i + 1] === "|") {
        cell += "|";
        i++;
      } else if (text[i] === "|") {
        cells.push(cell.trim());
        cell = "";
      } else {
        cell += text[i];
      }
    }
    cells.push(cell.trim());
    return cells;
  }

  function table(lines, i, parent, depth) {
    const head = splitRow(lines[i]);
    const aligns = splitRow(lines[i + 1]).map((c) =>
      c.startsWith(":") && c.endsWith(":")
        ? "pw-center"
        : c.endsWith(":")
          ? "pw-right"
          : "",
    );
    const row = (cells, tag) => {
      const tr = h("tr");
      head.forEach((_, n) => {
        const cell = h(tag, { class: aligns[n] || null });
        inline(cells[n] || "", cell, depth, false);
        tr.append(cell);
      });
      return tr;
    };
    const body = h("tbody");
    for (i += 2; i < lines.length && lines[i].trim() && lines[i].includes("|"); i++) {
      body.append(row(splitRow(lines[i]), "td"));
    }
    const el = h("table", null, h("thead", null, row(head, "th")), body);
    parent.append(h("div", { class: "pw-table" }, el));
    return i;
  }

  function safeUrl(raw) {
    const text = String(raw).trim().replace(/\\(.)/g, "$1");
    if (!/^(?:https?:\/\/|mailto:)/i.test(text)) return null;
    try {
      const url = new URL(text);
      return ["http:", "https:", "mailto:"].includes(url.protocol) ? url.href : null;
    } catch (_) {
      return null;
    }
  }

  function anchor(href) {
    return h("a", { href, target: "_blank", rel: LINK_REL });
  }

  function parseLink(text, at) {
    let level = 0;
    let j = at;
    const limit = Math.min(text.length, at + 2000);
    for (; j < limit; j++) {
      if (text[j] === "\\") j++;
      else if (text[j] === "[") level++;
      else if (text[j] === "]" && --level === 0) break;
    }
    if (j >= limit || text[j + 1] !== "(") return null;
    const label = text.slice(at + 1, j);
    let k = j + 2;
    let url;
    while (text[k] === " ") k++;
    if (text[k] === "<") {
      const end = text.indexOf(">", k);
      if (end < 0) return null;
      url = text.slice(k + 1, end);
      k = end + 1;
    } else {
      const start = k;
      let parens = 0;
      for (; k < text.length && !/\s/.test(text[k]); k++) {
        if (text[k] === "\\") k++;
        else if (text[k] === "(") parens++;
        else if (text[k] === ")" && parens-- === 0) break;
      }
      url = text.slice(start, k);
    }
    while (text[k] === " ") k++;
    if (text[k] === '"' || text[k] === "'") {
      const end = text.indexOf(text[k], k + 1);
      if (end < 0) return null;
      k = end + 1;
      while (text[k] === " ") k++;
    }
    if (text[k] !== ")") return null;
    return { label, url, end: k + 1 };
  }

  function closing(text, from, mark) {
    const c = mark[0];
    for (let j = text.indexOf(mark, from); j >= 0; j = text.indexOf(mark, j + 1)) {
      if (/\s/.test(text[j - 1])) continue;
      if (mark.length === 1 && text[j + 1] === c) {
        // part of a double mark: skip the whole run
        while (text[j + 1] === c) j++;
        continue;
      }
      if (mark.length === 2 && text[j + 2] === c) j++; // ***x***: close the inner first
      if (c === "_" && WORD.test(text[j + mark.length] || "")) continue;
      return j > from ? j : -1;
    }
    return -1;
  }

  function inline(text, parent, depth, inLink) {
    let buffer = "";
    const add = (node) => {
      if (buffer) parent.append(buffer);
      buffer = "";
      parent.append(node);
    };
    const nested = (node, inner, noLinks) => {
      if (depth < MAX_DEPTH) inline(inner, node, depth + 1, noLinks);
      else node.append(inner);
      add(node);
    };
    let i = 0;
    while (i < text.length) {
      const c = text[i];
      if (c === "\\" && i + 1 < text.length && ESCAPABLE.includes(text[i + 1])) {
        buffer += text[i + 1];
        i += 2;
        continue;
      }
      if (c === "`") {
        let n = 1;
        while (text[i + n] === "`") n++;
        let end = -1;
        for (let j = text.indexOf("`", i + n); j >= 0; j = text.indexOf("`", j)) {
          let k = j;
          while (text[k] === "`") k++;
          if (k - j === n) {
            end = j;
            break;
          }
          j = k;
        }
        if (end >= 0) {
          let code = text.slice(i + n, end);
          if (/^ .*\S.* $/.test(code)) code = code.slice(1, -1);
          add(h("code", null, code));
          i = end + n;
        } else {
          buffer += text.slice(i, i + n);
          i += n;
        }
        continue;
      }
      if (!inLink && (c === "[" || (c === "!" && text[i + 1] === "["))) {
        const link = parseLink(text, c === "!" ? i + 1 : i);
        if (link) {
          const href = safeUrl(link.url);
          if (!href) {
            buffer += text.slice(i, link.end); // not a safe link: show it as written
          } else if (c === "!") {
            // images are never loaded: a link to them, named by their alt text
            const a = anchor(href);
            a.className = "pw-image-link";
            a.append(link.label.trim() || "image");
            add(a);
          } else {
            nested(anchor(href), link.label, true);
          }
          i = link.end;
          continue;
        }
      }
      if (!inLink && (c === "h" || c === "H") && !WORD.test(text[i - 1] || "")) {
        BARE_URL.lastIndex = i;
        const m = BARE_URL.exec(text);
        if (m) {
          let url = m[0];
          while (/[.,;:!?*_~'")\]]$/.test(url)) {
            if (url.endsWith(")") && url.split("(").length > url.split(")").length - 1) break;
            url = url.slice(0, -1);
          }
          const href = safeUrl(url);
          if (href) {
            const a = anchor(href);
            a.append(url);
            add(a);
            i += url.length;
            continue;
          }
        }
      }
      if (c === "*" || c === "_" || (c === "~" && text[i + 1] === "~")) {
        const mark = text[i + 1] === c ? c + c : c;
        const open = i + mark.length;
        const next = text[open] || " ";
        if (!/\s/.test(next) && !(c === "_" && WORD.test(text[i - 1] || ""))) {
          const close = closing(text, open, mark);
          if (close > open) {
            const tag = c === "~" ? "del" : mark.length === 2 ? "strong" : "em";
            nested(h(tag), text.slice(open, close), inLink);
            i = close + mark.length;
            continue;
          }
        }
        buffer += mark;
        i += mark.length;
        continue;
      }
      buffer += c;
      i++;
    }
    if (buffer) parent.append(buffer);
  }

  // --------------------------------------------------------------------- the UI

  let cid = "";
  let current = null; // the reply in progress
  let started = null;
  let ui = null;
  let lastSeq = -1; // the newest turn shown from the history
  let polling = 0; // the timer of the next look for people's replies; 0: not looking

  function build() {
    const panelTag = MODE === "page" ? "main" : "section";
    const titleEl = h(MODE === "page" ? "h1" : "h2", { id: "pw-title", class: "pw-title" }, TITLE);
    const restart = h(
      "button",
      { type: "button", class: "pw-hbtn pw-restart", title: "Forget this conversation" },
      icon("restart"),
      h("span", null, "Start over"),
    );
    const close =
      MODE === "launcher"
        ? h(
            "button",
            { type: "button", class: "pw-hbtn pw-close", "aria-label": "Close chat" },
            icon("close"),
          )
        : null;
    const empty = h("p", { class: "pw-empty" }, "Send us a message and we'll reply right here.");
    const log = h(
      "div",
      {
        class: "pw-log",
        role: "log",
        "aria-live": "polite",
        "aria-relevant": "additions text",
        "aria-label": "Messages",
        tabindex: "0",
      },
      empty,
    );
    const status = h("div", { class: "pw-status", role: "status", "aria-live": "polite" });
    const input = h("textarea", {
      id: "pw-input",
      class: "pw-input",
      rows: "1",
      placeholder: "Write a message…",
      autocomplete: "off",
      enterkeyhint: "send",
      "aria-describedby": "pw-hint",
    });
    const send = h(
      "button",
      { type: "submit", class: "pw-send" },
      icon("send"),
      h("span", { class: "pw-vh" }, "Send"),
    );
    const form = h(
      "form",
      { class: "pw-compose", novalidate: true },
      h("label", { for: "pw-input", class: "pw-vh" }, "Message"),
      h("span", { id: "pw-hint", class: "pw-vh" }, "Enter sends, Shift+Enter adds a line."),
      input,
      send,
    );
    const panel = h(
      panelTag,
      {
        id: "pw-panel",
        class: "pw-panel",
        role: MODE === "launcher" ? "dialog" : null,
        "aria-modal": MODE === "launcher" ? "false" : null,
        "aria-labelledby": "pw-title",
        hidden: MODE === "launcher",
      },
      h("div", { class: "pw-header" }, titleEl, h("div", { class: "pw-actions" }, restart, close)),
      log,
      status,
      form,
    );
    const launcher =
      MODE === "launcher"
        ? h(
            "button",
            {
              type: "button",
              class: "pw-launcher",
              "aria-label": TITLE,
              "aria-expanded": "false",
              "aria-controls": "pw-panel",
            },
            icon("chat"),
            icon("down"),
          )
        : null;
    const mode = MODE === "page" ? "pw-page" : "pw-launcher-mode";
    const root = h("div", { class: "pw " + mode, hidden: true }, panel, launcher);
    return { root, panel, launcher, close, restart, log, empty, status, input, send, form };
  }

  function mount() {
    const host = document.createElement("parley-chat");
    host.setAttribute("data-parley-mode", MODE);
    const shadow = host.attachShadow({ mode: "open" });
    ui = build();
    // Unstyled until the stylesheet arrives; shown either way once it settles.
    const css = h("link", { rel: "stylesheet", href: BASE + "/widget.css" });
    let revealed = false;
    const reveal = () => {
      if (revealed) return;
      revealed = true;
      ui.root.hidden = false;
      if (MODE === "page") {
        start();
        ui.input.focus();
      }
    };
    css.addEventListener("load", reveal, { once: true });
    css.addEventListener("error", reveal, { once: true });
    setTimeout(reveal, 5000);
    shadow.append(css, ui.root);
    wire();
    document.body.append(host);
  }

  function wire() {
    if (ui.launcher) ui.launcher.addEventListener("click", () => (isOpen() ? hide() : show()));
    if (ui.close) ui.close.addEventListener("click", () => hide());
    ui.restart.addEventListener("click", () => startOver());
    ui.root.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && MODE === "launcher" && isOpen() && !event.isComposing) {
        event.preventDefault();
        hide();
      }
    });
    ui.form.addEventListener("submit", (event) => {
      event.preventDefault();
      submit();
    });
    ui.input.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
        event.preventDefault();
        submit();
      }
    });
    ui.input.addEventListener("input", autosize);
  }

  function isOpen() {
    return !ui.panel.hidden;
  }

  function show() {
    ui.panel.hidden = false;
    ui.root.classList.add("pw-is-open");
    ui.launcher.setAttribute("aria-expanded", "true");
    start();
    ui.input.focus();
    scrollDown();
  }

  function hide() {
    ui.panel.hidden = true;
    ui.root.classList.remove("pw-is-open");
    ui.launcher.setAttribute("aria-expanded", "false");
    ui.launcher.focus();
  }

  function autosize() {
    const input = ui.input;
    input.style.height = "auto";
    input.style.height = Math.min(input.scrollHeight + 2, 160) + "px";
  }

  function setStatus(text, kind) {
    ui.status.textContent = text || "";
    ui.status.className = "pw-status" + (text && kind ? " pw-status-" + kind : "");
  }

  function setBusy(busy) {
    ui.send.disabled = busy;
  }

  function nearBottom() {
    const log = ui.log;
    return log.scrollHeight - log.scrollTop - log.clientHeight < 48;
  }

  function scrollDown() {
    ui.log.scrollTop = ui.log.scrollHeight;
  }

  function append(node) {
    const stick = nearBottom();
    ui.empty.hidden = true;
    ui.log.append(node);
    if (stick || node.classList.contains("pw-user")) scrollDown();
  }

  function clearLog() {
    ui.log.replaceChildren(ui.empty);
    ui.empty.hidden = false;
  }

  function addUser(text) {
    const msg = h(
      "div",
      { class: "pw-msg pw-user" },
      h("span", { class: "pw-vh" }, "You: "),
      h("div", { class: "pw-bubble" }, text),
    );
    append(msg);
    return msg;
  }

  function addAssistant(text, busy) {
    const body = h("div", { class: "pw-bubble pw-md" });
    const msg = h(
      "div",
      { class: "pw-msg pw-assistant", "aria-busy": busy ? "true" : null },
      h("span", { class: "pw-vh" }, TITLE + ": "),
      body,
    );
    if (text) body.append(markdown(text));
    else if (busy) body.append(typing());
    append(msg);
    return { msg, body };
  }

  // A person's reply (a handed-off conversation): their name, in a style of its own.
  function addAgent(name, text) {
    const who = name || "Support team";
    const msg = h(
      "div",
      { class: "pw-msg pw-agent" },
      h("span", { class: "pw-who", "aria-hidden": "true" }, who),
      h("span", { class: "pw-vh" }, who + " (a person): "),
      h("div", { class: "pw-bubble pw-md" }, markdown(text)),
    );
    append(msg);
    return msg;
  }

  function seen(message) {
    if (typeof message.seq === "number" && message.seq > lastSeq) lastSeq = message.seq;
  }

  function typing() {
    return h(
      "span",
      { class: "pw-typing" },
      h("span", { class: "pw-vh" }, "Writing…"),
      h("span", { class: "pw-dot" }),
      h("span", { class: "pw-dot" }),
      h("span", { class: "pw-dot" }),
    );
  }

  function addNotice(data, before) {
    const kind = typeof data.kind === "string" ? data.kind : "notice";
    const note = h("p", { class: "pw-notice", "data-kind": kind }, String(data.text || ""));
    if (before) {
      ui.empty.hidden = true;
      before.before(note);
    } else {
      append(note);
    }
  }

  // ---------------------------------------------------------------- the API

  function api(path) {
    return BASE + "/v1/conversations/" + encodeURIComponent(cid) + path;
  }

  function auth(extra) {
    return Object.assign({ Authorization: "Bearer " + KEY }, extra || {});
  }

  async function errorText(response) {
    let message = "";
    try {
      const body = await response.json();
      message = body && body.error && body.error.message;
    } catch (_) {
      /* not our JSON: a proxy's page */
    }
    if (typeof message !== "string" || !message) {
      message = "The chat server answered " + response.status + ".";
    }
    const wait = response.headers.get("Retry-After");
    if (response.status === 429 && wait && /^\d+$/.test(wait)) {
      message += " Try again in " + wait + " s.";
    }
    return message;
  }

  function start() {
    if (!started) started = boot();
    return started;
  }

  async function boot() {
    if (!KEY) {
      ui.input.disabled = true;
      ui.send.disabled = true;
      ui.restart.disabled = true;
      setStatus(
        MODE === "page"
          ? "This chat needs an API key: open it as /chat#key=pk_…"
          : "This chat is missing its data-parley-key.",
        "error",
      );
      return;
    }
    cid = storedConversation();
    if (!cid) return;
    const messages = await loadHistory();
    if (!messages) {
      started = null; // try again on the next open or message
      return;
    }
    const pending = readPending();
    if (!pending || pending.cid !== cid) return;
    const last = messages[messages.length - 1];
    const before = messages[messages.length - 2];
    if (last && last.role === "assistant" && before && before.content === pending.text) {
      save("pending", null); // answered and recorded while we were away
      return;
    }
    // The page was left (or the connection lost) mid-reply: read it again from the start.
    const recorded = last && last.role === "user" && last.content === pending.text;
    const reply = newReply(pending.text, !recorded);
    reply.id = pending.reply;
    follow(reply, true);
  }

  async function loadHistory() {
    let response;
    try {
      response = await fetch(api("/messages"), {
        headers: auth({ Accept: "application/json" }),
        cache: "no-store",
      });
    } catch (_) {
      setStatus("Could not load the conversation: the chat server is unreachable.", "error");
      return null;
    }
    if (!response.ok) {
      setStatus(await errorText(response), "error");
      return null;
    }
    let body;
    try {
      body = await response.json();
    } catch (_) {
      setStatus("Could not read the conversation.", "error");
      return null;
    }
    const messages = (body && body.messages) || [];
    clearLog();
    lastSeq = -1;
    for (const message of messages) {
      seen(message);
      if (message.role === "user") addUser(String(message.content));
      else if (message.role === "assistant") addAssistant(String(message.content), false);
      else if (message.role === "agent") addAgent(message.name, String(message.content));
    }
    scrollDown();
    if (body.handed_off) watchPeople();
    return messages;
  }

  // ------------------------------------------------------ people's replies

  function watchPeople() {
    if (!polling && cid) polling = setTimeout(lookForPeople, POLL_MS);
  }

  function stopWatching() {
    clearTimeout(polling);
    polling = 0;
  }

  async function lookForPeople() {
    const asked = cid;
    let body = null;
    try {
      const response = await fetch(api("/messages" + (lastSeq >= 0 ? "?after=" + lastSeq : "")), {
        headers: auth({ Accept: "application/json" }),
        cache: "no-store",
      });
      if (response.ok) body = await response.json();
    } catch (_) {
      /* unreachable for now: look again later */
    }
    if (!polling || asked !== cid) return; // started over meanwhile
    if (!body || !Array.isArray(body.messages)) {
      polling = setTimeout(lookForPeople, POLL_BACKOFF_MS);
      return;
    }
    for (const message of body.messages) {
      if (typeof message.seq === "number" && message.seq <= lastSeq) continue;
      seen(message);
      if (message.role === "agent") addAgent(message.name, String(message.content));
    }
    polling = body.handed_off ? setTimeout(lookForPeople, POLL_MS) : 0;
  }

  let sending = false;

  async function submit() {
    ui.input.focus(); // Send is disabled while a reply runs: keep focus in the box
    const text = ui.input.value.trim();
    if (!text || !KEY || sending) return;
    if (current) {
      if (!ui.status.textContent) setStatus("Wait for this reply to finish, then send.");
      return;
    }
    sending = true;
    try {
      await start(); // the history first, so it never lands below this message
    } finally {
      sending = false;
    }
    if (!current && ui.input.value.trim() === text) send(text);
  }

  function newReply(text, showUser) {
    const reply = {
      id: null,
      text, // what the user sent
      answer: "",
      lastId: -1,
      done: false,
      stopped: false,
      conn: null,
      frame: 0,
      user: showUser ? addUser(text) : null,
    };
    const assistant = addAssistant("", true);
    reply.msg = assistant.msg;
    reply.body = assistant.body;
    current = reply;
    setBusy(true);
    return reply;
  }

  async function send(text) {
    const reply = newReply(text, true);
    ui.input.value = "";
    autosize();
    setStatus("");
    reply.user.classList.add("pw-pending");
    reply.fresh = !cid;
    if (reply.fresh) {
      cid = newConversationId();
      save("conversation", cid);
    }
    let response;
    try {
      response = await fetch(api("/messages"), {
        method: "POST",
        headers: auth({ "Content-Type": "application/json", Accept: "text/event-stream" }),
        body: JSON.stringify({ text, stream: true }),
        cache: "no-store",
        signal: connection(reply),
      });
    } catch (_) {
      if (!reply.stopped) {
        unsend(reply, "Could not reach the chat server, so your message was not sent. Try again.");
      }
      return;
    }
    if (reply.stopped) return; // started over meanwhile
    if (!response.ok) {
      unsend(reply, await errorText(response));
      return;
    }
    reply.user.classList.remove("pw-pending");
    reply.id = response.headers.get("X-Reply-Id") || null;
    remember(reply);
    try {
      await readEvents(response, reply);
    } catch (_) {
      /* the connection broke: follow on below */
    }
    if (!reply.done && !reply.stopped) await follow(reply, false);
  }

  function remember(reply) {
    if (reply.id) save("pending", JSON.stringify({ cid, reply: reply.id, text: reply.text }));
  }

  function connection(reply) {
    reply.conn = new AbortController();
    return reply.conn.signal;
  }

  function unsend(reply, message) {
    // Never lose what the user typed: it goes back into the box.
    release(reply);
    reply.user.remove();
    reply.msg.remove();
    if (reply.fresh) {
      cid = ""; // nothing was said in it: no conversation to keep
      save("conversation", null);
    }
    if (ui.log.children.length === 1) ui.empty.hidden = false;
    const typed = ui.input.value;
    ui.input.value = typed ? reply.text + "\n" + typed : reply.text;
    autosize();
    setStatus(message, "error");
  }

  function release(reply) {
    reply.stopped = true;
    if (reply.frame) cancelAnimationFrame(reply.frame);
    reply.frame = 0;
    if (current === reply) {
      current = null;
      setBusy(false);
    }
  }

  async function follow(reply, immediately) {
    let attempt = 0;
    while (!reply.done && !reply.stopped) {
      if (!reply.id || attempt >= RETRY_MS.length) {
        giveUp(reply);
        return;
      }
      setStatus("Reconnecting…");
      const delay = immediately && attempt === 0 ? 0 : RETRY_MS[attempt];
      attempt++;
      await new Promise((resolve) => setTimeout(resolve, delay));
      if (reply.stopped) return;
      const seen = reply.lastId;
      const headers = { Accept: "text/event-stream" };
      if (reply.lastId >= 0) headers["Last-Event-ID"] = String(reply.lastId);
      let response;
      try {
        response = await fetch(api("/replies/" + reply.id), {
          headers: auth(headers),
          cache: "no-store",
          signal: connection(reply),
        });
      } catch (_) {
        continue;
      }
      if (response.status === 404) {
        await fromHistory(reply);
        return;
      }
      if (!response.ok) {
        if (response.status < 500 && response.status !== 429) {
          giveUp(reply, await errorText(response));
          return;
        }
        continue;
      }
      setStatus("");
      try {
        await readEvents(response, reply);
      } catch (_) {
        /* broke again */
      }
      if (reply.lastId > seen) attempt = 0;
    }
  }

  async function fromHistory(reply) {
    // The server no longer keeps the reply: it ended, and history holds what was kept.
    release(reply);
    const messages = await loadHistory();
    if (!messages) {
      giveUp(reply);
      return;
    }
    save("pending", null);
    const last = messages[messages.length - 1];
    if (last && last.role === "assistant") setStatus("");
    else setStatus("The reply was not finished. Send your message again.", "error");
  }

  function giveUp(reply, message) {
    release(reply);
    reply.msg.setAttribute("aria-busy", "false");
    reply.msg.classList.add("pw-incomplete");
    if (reply.answer) paint(reply);
    else reply.body.replaceChildren("The reply could not be loaded.");
    setStatus(
      message ||
        "Lost the connection to the chat server, so this reply is incomplete. " +
          "Reload the page later to see all of it.",
      "error",
    );
  }

  async function readEvents(response, reply) {
    const conn = reply.conn;
    let timer = 0;
    const arm = () => {
      clearTimeout(timer);
      timer = setTimeout(() => conn.abort(), STALL_MS);
    };
    const parser = sse((event) => handle(reply, event));
    try {
      if (!response.body) {
        parser(await response.text(), true);
        return;
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      arm();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        arm();
        parser(decoder.decode(value, { stream: true }), false);
        if (reply.done || reply.stopped) {
          reader.cancel().catch(() => {});
          break;
        }
      }
      parser(decoder.decode(), true);
    } finally {
      clearTimeout(timer);
    }
  }

  function sse(dispatch) {
    let buffer = "";
    let fields = { id: "", event: "", data: [] };
    return (chunk, end) => {
      buffer += chunk;
      for (;;) {
        const at = buffer.search(/[\r\n]/);
        if (at < 0 || (buffer[at] === "\r" && at === buffer.length - 1 && !end)) break;
        const line = buffer.slice(0, at);
        buffer = buffer.slice(at + (buffer[at] === "\r" && buffer[at + 1] === "\n" ? 2 : 1));
        if (line === "") {
          if (fields.data.length) {
            dispatch({ id: fields.id, event: fields.event || "message", data: fields.data.join("\n") });
          }
          fields = { id: "", event: "", data: [] };
        } else if (line[0] !== ":") {
          const colon = line.indexOf(":");
          const name = colon < 0 ? line : line.slice(0, colon);
          let value = colon < 0 ? "" : line.slice(colon + 1);
          if (value[0] === " ") value = value.slice(1);
          if (name === "data") fields.data.push(value);
          else if (name === "event") fields.event = value;
          else if (name === "id") fields.id = value;
        }
      }
    };
  }

  function handle(reply, event) {
    if (reply.stopped || reply.done) return;
    if (/^\d+$/.test(event.id)) {
      const id = Number(event.id);
      if (id <= reply.lastId) return; // seen already
      reply.lastId = id;
    }
    let data;
    try {
      data = JSON.parse(event.data);
    } catch (_) {
      return;
    }
    if (!data || typeof data !== "object") return;
    if (event.event === "reply") {
      if (!reply.id && typeof data.reply_id === "string") {
        reply.id = data.reply_id;
        remember(reply);
      }
    } else if (event.event === "delta") {
      reply.answer += String(data.text || "");
      if (!reply.frame) reply.frame = requestAnimationFrame(() => paint(reply));
    } else if (event.event === "notice") {
      addNotice(data, reply.answer ? null : reply.msg);
    } else if (event.event === "done") {
      finish(reply, data);
    }
  }

  function paint(reply) {
    reply.frame = 0;
    const stick = nearBottom();
    if (reply.answer) reply.body.replaceChildren(markdown(reply.answer));
    if (stick) scrollDown();
  }

  function finish(reply, data) {
    reply.done = true;
    const whole = typeof data.text === "string" ? data.text : reply.answer;
    if (whole !== reply.answer) {
      console.warn("parley: the streamed reply differs from the final one; showing the final one");
      reply.answer = whole;
    }
    release(reply);
    save("pending", null);
    if (reply.answer) {
      paint(reply);
      showSources(reply, Array.isArray(data.sources) ? data.sources : []);
      reply.msg.setAttribute("aria-busy", "false");
    } else {
      reply.msg.remove(); // only notices answered
    }
    const notices = Array.isArray(data.notices) ? data.notices : [];
    if (data.handed_off === true) {
      watchPeople();
      if (!reply.answer && !notices.length) setStatus("Sent. A person will answer here.");
      return;
    }
    if (!reply.answer && notices.some((n) => n && REFUSED.includes(n.kind)) && reply.user) {
      // Refused (a limit): the message was not taken, so offer it again.
      reply.user.classList.add("pw-unsent");
      reply.user.querySelector(".pw-bubble").before(h("span", { class: "pw-flag" }, "Not sent"));
      if (!ui.input.value) {
        ui.input.value = reply.text;
        autosize();
      }
    }
    if (!ui.status.classList.contains("pw-status-error")) setStatus(""); // stale by now
  }

  // The documentation an answer came from: links where they are web addresses.
  function showSources(reply, sources) {
    const items = sources
      .filter((s) => s && typeof s.title === "string")
      .map((s) => {
        const href = typeof s.link === "string" ? safeUrl(s.link) : null;
        if (!href) return h("li", null, s.title);
        const a = anchor(href);
        a.append(s.title);
        return h("li", null, a);
      });
    if (!items.length) return;
    reply.body.after(
      h("div", { class: "pw-sources" }, h("span", null, "Sources"), h("ul", null, ...items)),
    );
  }

  async function startOver() {
    if (current) {
      const reply = current;
      release(reply);
      if (reply.conn) reply.conn.abort();
      reply.msg.setAttribute("aria-busy", "false");
      reply.msg.classList.add("pw-incomplete");
    }
    await start();
    if (cid) {
      let response;
      try {
        response = await fetch(api(""), { method: "DELETE", headers: auth(), cache: "no-store" });
      } catch (_) {
        setStatus("Could not reach the chat server; the conversation was not cleared.", "error");
        return;
      }
      if (!response.ok && response.status !== 404) {
        setStatus(await errorText(response), "error");
        return;
      }
    }
    cid = "";
    stopWatching();
    lastSeq = -1;
    save("conversation", null);
    save("pending", null);
    clearLog();
    setStatus("Started a new conversation.");
    ui.input.focus();
  }

  if (document.body) mount();
  else document.addEventListener("DOMContentLoaded", mount, { once: true });
})();
