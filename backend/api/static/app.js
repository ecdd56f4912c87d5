// The page of `apexmtp run`: chat over /v1/chat/completions (SSE), the gallery with fit verdicts, pulls and model
// switching, and the server's status. Plain browser JavaScript, no build step, nothing loaded from elsewhere.
import { renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const STATUS_EVERY_MS = 2000;

// ---------------------------------------------------------------------------------------------- storage

const store = {
  get(key, fallback) {
    try {
      const raw = localStorage.getItem(`apexmtp.${key}`);
      return raw === null ? fallback : JSON.parse(raw);
    } catch {
      return fallback;
    }
  },
  set(key, value) {
    localStorage.setItem(`apexmtp.${key}`, JSON.stringify(value));
  },
};

let conversation = store.get("conversation", []);
const settings = { temperature: 0.7, max_tokens: 512, ...store.get("settings", {}) };
let apiKey = store.get("key", "");
let controller = null; // the chat request in flight
let serving = [];  // names of the served model (name and aliases)

// ---------------------------------------------------------------------------------------------- HTTP

class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const headers = {};
  if (options.body) headers["Content-Type"] = "application/json";
  if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
  const resp = await fetch(path, { ...options, headers });
  if (!resp.ok) {
    let message = `HTTP ${resp.status}`;
    try {
      message = (await resp.json()).error?.message || message;
    } catch { /* not JSON: keep the status line */ }
    if (resp.status === 401) showKeyForm();
    throw new HttpError(resp.status, `${message} (HTTP ${resp.status})`);
  }
  return resp;
}

/** The JSON objects of a server-sent event stream, until `data: [DONE]` or the end of the body. */
async function* events(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------- formatting

const GiB = 2 ** 30, MiB = 2 ** 20, KiB = 2 ** 10;
function bytes(n) {
  if (n >= GiB) return `${(n / GiB).toFixed(1)} GiB`;
  if (n >= MiB) return `${(n / MiB).toFixed(n >= 100 * MiB ? 0 : 1)} MiB`;
  return `${Math.round(n / KiB)} KiB`;
}
const count = (n) => (n ?? 0).toLocaleString("en-US");
const percent = (part, whole) => (whole ? `${Math.round((100 * part) / whole)}%` : "–");
const context = (n) => (n % 1024 === 0 ? `${n / 1024}k` : `${n}`);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function definitions(target, rows) {
  target.replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, String(v))]));
}

// ---------------------------------------------------------------------------------------------- banner, key

function banner(text, kind = "error") {
  const node = $("banner");
  node.hidden = !text;
  node.className = `banner ${kind}`;
  node.textContent = text || "";
}

function showKeyForm() {
  $("key-form").hidden = false;
  $("key-input").focus();
}

// ---------------------------------------------------------------------------------------------- tabs

function showTab(name) {
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.tab === name);
  for (const panel of document.querySelectorAll(".panel")) panel.hidden = panel.id !== name;
  if (name === "gallery") loadGallery();
  if (name === "status") refreshStatus();
}

// ---------------------------------------------------------------------------------------------- chat

function statsLine(m) {
  if (m.state === "streaming") return `generating… ${m.chunks || 0} chunks`;
  const parts = [];
  if (m.state === "stopped") parts.push(`stopped after ${m.chunks || 0} chunks`);
  const t = m.timings;
  if (t) parts.push(`${t.predicted_n} tokens`, `${t.predicted_per_second.toFixed(1)} tok/s`);
  if (m.ttft_ms !== undefined) parts.push(`first token ${Math.round(m.ttft_ms)} ms`);
  if (t) {
    parts.push(t.draft_n ? `MTP ${t.draft_n_accepted}/${t.draft_n} drafts accepted (${percent(t.draft_n_accepted, t.draft_n)})`
      : "MTP: no drafts");
  }
  return parts.join(" · ");
}

function fillMessage(node, m) {
  node.className = `msg ${m.role}${m.state === "error" ? " error" : ""}`;
  if (m.role !== "assistant") {
    node.textContent = m.content;
    return;
  }
  const parts = [];
  if (m.reasoning) {
    const wasOpen = node.querySelector("details")?.open ?? false;
    const body = el("div", { class: "md" }, m.reasoning);
    parts.push(el("details", { class: "reasoning", ...(wasOpen ? { open: "" } : {}) },
      el("summary", {}, m.state === "streaming" && !m.content ? "Reasoning…" : "Reasoning"), body));
  }
  const md = el("div", { class: "md" });
  md.append(renderMarkdown(m.content));
  parts.push(md);
  if (m.error) parts.push(el("div", { class: "error-text" }, m.error));
  parts.push(el("div", { class: "stats" }, statsLine(m)));
  node.replaceChildren(...parts);
}

function renderConversation() {
  const list = $("messages");
  const nodes = conversation.map((m) => {
    const node = el("div");
    fillMessage(node, m);
    return node;
  });
  if (!nodes.length) {
    nodes.push(el("div", { class: "msg note" }, "Ask something: the answer streams from /v1/chat/completions, with its "
      + "speed and MTP draft acceptance underneath."));
  }
  list.replaceChildren(...nodes);
  list.scrollTop = list.scrollHeight;
}

function save() {
  store.set("conversation", conversation.map(({ role, content, reasoning, state, error, timings, ttft_ms, chunks }) => (
    { role, content, reasoning, state: state === "streaming" ? "stopped" : state, error, timings, ttft_ms, chunks })));
}

function history() {
  return conversation
    .filter((m) => (m.role === "user" || m.role === "assistant") && m.content && m.state !== "error")
    .map(({ role, content }) => ({ role, content }));
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

let pending = null;
function scheduleUpdate(node, m) {
  if (pending) return;
  pending = requestAnimationFrame(() => {
    pending = null;
    fillMessage(node, m);
    const list = $("messages");
    list.scrollTop = list.scrollHeight;
  });
}

async function send() {
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  conversation.push({ role: "user", content: text });
  const m = { role: "assistant", content: "", reasoning: "", state: "streaming", chunks: 0 };
  const body = { messages: history(), stream: true, stream_options: { include_usage: true },
                 temperature: settings.temperature, max_tokens: settings.max_tokens };
  conversation.push(m);
  save();
  renderConversation();
  const node = $("messages").lastElementChild;
  controller = new AbortController();
  setBusy(true);
  const started = performance.now();
  try {
    const resp = await api("/v1/chat/completions", { method: "POST", body: JSON.stringify(body), signal: controller.signal });
    for await (const chunk of events(resp)) {
      if (chunk.error) throw new HttpError(0, chunk.error.message);
      const delta = chunk.choices?.[0]?.delta;
      if (delta && (delta.content || delta.reasoning_content)) {
        if (m.ttft_ms === undefined) m.ttft_ms = performance.now() - started;
        m.content += delta.content || "";
        m.reasoning += delta.reasoning_content || "";
        m.chunks += 1;
      }
      if (chunk.timings) m.timings = chunk.timings;
      scheduleUpdate(node, m);
    }
    m.state = "done";
  } catch (e) {
    if (e.name === "AbortError") m.state = "stopped";
    else Object.assign(m, { state: "error", error: e.message });
  } finally {
    if (pending) cancelAnimationFrame(pending);
    pending = null;
    controller = null;
    setBusy(false);
    fillMessage(node, m);
    save();
    refreshStatus();
  }
}

function note(text) {
  conversation.push({ role: "note", content: text });
  save();
  renderConversation();
}

// ---------------------------------------------------------------------------------------------- gallery

const VERDICTS = { gpu: ["gpu", "fits on the GPU"], "gpu+ram": ["gpuram", "GPU + RAM"], cpu: ["cpu", "CPU"] };

function verdictCell(v) {
  const [cls, label] = v.fits ? VERDICTS[v.placement] ?? ["cpu", v.placement] : ["nofit", "does not fit"];
  const facts = [];
  if (v.fits && v.n_cpu_moe) facts.push(`experts of ${v.n_cpu_moe} layers in RAM`);
  if (v.fits && v.context) facts.push(`context ${context(v.context)}`);
  if (v.fits && v.mtp) facts.push("MTP on");
  if (v.predicted_tok_s) facts.push(`~${Number(v.predicted_tok_s).toFixed(0)} tok/s predicted`);
  return el("td", { class: "verdict" }, el("span", { class: `badge ${cls}` }, label),
    facts.length ? ` ${facts.join(" · ")}` : null, el("div", { class: "why" }, v.why || ""));
}

function actionCell(name, downloaded) {
  const cell = el("td", { class: "action" });
  if (serving.includes(name)) cell.append(el("span", { class: "badge serving" }, "serving"));
  else if (downloaded) cell.append(el("button", { class: "secondary", onclick: () => useModel(name) }, "Use"));
  else cell.append(el("button", { class: "secondary", onclick: () => pullTier(name, cell) }, "Pull"));
  return cell;
}

function familyCard(f) {
  const rows = f.tiers.map((t) => el("tr", { class: t.recommended ? "recommended" : "", "data-name": t.name },
    el("td", {}, t.tier, t.recommended ? el("span", { class: "badge star", title: "the best tier that fits this machine" },
      " recommended") : null),
    el("td", { class: "num" }, bytes(t.size)),
    el("td", { class: "num" }, t.kl_mean === null ? "–" : t.kl_mean.toFixed(4)),
    el("td", {}, t.mtp ? "MTP" : ""),
    verdictCell(t.verdict),
    actionCell(t.name, t.downloaded)));
  const head = el("tr", {}, ...["tier", "size", "KL vs BF16", "", "on this machine", ""].map((h) => el("th", {}, h)));
  return el("div", { class: "card family", "data-family": f.name },
    el("h2", {}, f.name), el("p", { class: "desc" }, `${f.repo} · ${f.license} · ${f.description}`),
    el("table", {}, el("thead", {}, head), el("tbody", {}, ...rows)));
}

function demoCard(demos) {
  const rows = demos.map((d) => el("tr", { "data-name": d.name }, el("td", {}, d.name), el("td", {}, d.description),
    el("td", {}, d.mtp ? "MTP" : ""), actionCell(d.name, true)));
  return el("div", { class: "card family", "data-family": "demos" }, el("h2", {}, "Built-in demos"),
    el("p", { class: "desc" }, "Offline models that ship with apexmtp: nothing to download."),
    el("table", {}, el("tbody", {}, ...rows)));
}

async function loadGallery() {
  try {
    const g = await (await api("/api/gallery")).json();
    serving = g.serving || [];
    const hw = g.hardware, budget = g.budget;
    const gpus = hw.gpus.length ? hw.gpus.map((x) => `${x.name} (${bytes(x.total)})`).join(", ") : "none";
    $("hardware").replaceChildren(el("h3", {}, "This machine"), el("p", { class: "desc" },
      `CPU: ${hw.cpu} (${hw.cpu_count} threads) · RAM ${bytes(hw.ram_total)}, ${bytes(budget.ram_free)} usable for models`
      + ` · GPU: ${gpus}${budget.gpu_free ? `, ${bytes(budget.gpu_free)} usable` : ""}`
      + (hw.overrides.length ? ` · given: ${hw.overrides.join(", ")}` : "")),
      el("p", { class: "desc" }, "Verdicts come from the tier selector (the memory model of each tier at its context, "
        + "with margins); the recommended tier is the best quality that fits."));
    $("families").replaceChildren(demoCard(g.demos), ...g.families.map(familyCard));
  } catch (e) {
    $("families").replaceChildren(el("div", { class: "card error-text" }, `gallery unavailable: ${e.message}`));
  }
}

async function pullTier(name, cell) {
  const bar = el("div");
  const text = el("span", { class: "progress-text" }, "starting…");
  cell.replaceChildren(el("span", { class: "progress", role: "progressbar" }, bar), text);
  try {
    const resp = await api("/api/pull", { method: "POST", body: JSON.stringify({ name }) });
    for await (const p of events(resp)) {
      const share = p.total ? p.bytes / p.total : 0;
      bar.style.width = `${(100 * share).toFixed(1)}%`;
      text.textContent = `${bytes(p.bytes)} of ${bytes(p.total)} (${Math.floor(100 * share)}%)`;
      if (p.state === "error") throw new Error(p.error);
    }
    await loadGallery();
  } catch (e) {
    cell.replaceChildren(el("div", { class: "error-text" }, `pull failed: ${e.message}`),
      el("button", { class: "secondary", onclick: () => pullTier(name, cell) }, "Retry"));
  }
}

async function useModel(name) {
  banner(`loading ${name}…`, "loading");
  try {
    const card = await (await api("/api/switch", { method: "POST", body: JSON.stringify({ name }) })).json();
    banner(null);
    note(`now serving ${card.id} (context ${context(card.meta.context_size)}, MTP ${card.meta.mtp ? "on" : "off"})`);
  } catch (e) {
    banner(`could not switch to ${name}: ${e.message}`);
  } finally {
    await refreshStatus();
    await loadGallery();
  }
}

// ---------------------------------------------------------------------------------------------- status

function renderPill(s) {
  const pill = $("pill");
  pill.className = `pill ${s.state}`;
  pill.textContent = s.state === "ready" ? s.model.name : s.state === "loading" ? "loading…" : "no model";
  pill.title = s.message || "serving";
}

function renderStatus(s) {
  const m = s.model, b = s.backend, f = b?.figures ?? {}, last = b?.last ?? {};
  definitions($("status-model"), m ? [["name", m.name], ["also answers to", m.aliases.join(", ") || "–"],
    ["context per slot", count(m.context_size)], ["MTP", m.mtp ? "on" : "off"], ["embeddings", m.embeddings ? "on" : "off"]]
    : [["state", s.state], ["why", s.message || "–"]]);
  definitions($("status-serving"), [["slots busy", b ? `${count(f.slots_busy)} of ${count(f.slots)}` : "–"],
    ["queue depth", count(f.queue_depth)], ["requests", count(f.requests_total)],
    ["prompt tokens", count(f.prompt_tokens_total)], ["generated tokens", count(f.generated_tokens_total)],
    ["last request", last.tokens ? `${count(last.tokens)} tokens, ${last.tokens_per_second.toFixed(1)} tok/s` : "–"],
    ["backend", b ? `${b.state.toLowerCase()} · pid ${b.pid} · ${b.addr}` : "not answering"]]);
  definitions($("status-mtp"), [["MTP", m ? (m.mtp ? "on" : "off") : "–"],
    ["drafted (all requests)", count(f.drafted_total)], ["accepted", count(f.accepted_total)],
    ["acceptance", percent(f.accepted_total, f.drafted_total)],
    ["last request", f.spec_drafted ? `${count(f.spec_accepted)}/${count(f.spec_drafted)} (${percent(f.spec_accepted, f.spec_drafted)})` : "–"]]);
  const memory = Object.entries(b?.memory ?? {}).filter(([, n]) => n > 0).sort((x, y) => y[1] - x[1]);
  const top = memory.length ? memory[0][1] : 1;
  const rows = memory.map(([part, n]) => {
    const bar = el("div");
    bar.style.width = `${((100 * n) / top).toFixed(1)}%`; // CSSOM, not a style attribute: the page's CSP allows only this
    return el("tr", {}, el("td", {}, part.replaceAll("_", " ")), el("td", { class: "num" }, bytes(n)), el("td", { class: "bar" }, bar));
  });
  if (b) rows.push(el("tr", {}, el("td", {}, "backend process (resident)"), el("td", { class: "num" }, bytes(b.rss)), el("td")));
  $("status-memory").replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", {}, "no model loaded"))]));
}

async function refreshStatus() {
  try {
    const s = await (await api("/api/status")).json();
    renderPill(s);
    renderStatus(s);
    serving = s.model ? [s.model.name, ...s.model.aliases] : [];
    if (s.state === "loading") banner(`loading model… ${s.message}`, "loading");
    else if (s.state === "down") banner(s.message || "no model is served");
    else if ($("banner").classList.contains("loading") || $("banner").dataset.fromStatus) banner(null);
    $("banner").dataset.fromStatus = s.state === "ready" ? "" : "1";
  } catch (e) {
    $("pill").className = "pill down";
    $("pill").textContent = e.status === 401 ? "API key needed" : "unreachable";
    banner(e.status === 401 ? "This server needs an API key: enter it below." : `server unreachable: ${e.message}`);
    $("banner").dataset.fromStatus = "1";
  }
}

// ---------------------------------------------------------------------------------------------- wiring

function start() {
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showTab(tab.dataset.tab));
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  $("stop").addEventListener("click", () => controller?.abort());
  $("clear").addEventListener("click", () => { conversation = []; save(); renderConversation(); });
  for (const [id, key] of [["temperature", "temperature"], ["max-tokens", "max_tokens"]]) {
    $(id).value = settings[key];
    $(id).addEventListener("change", () => {
      const value = Number($(id).value);
      if (Number.isFinite(value) && value >= 0) settings[key] = key === "max_tokens" ? Math.max(1, Math.round(value)) : value;
      $(id).value = settings[key];
      store.set("settings", settings);
    });
  }
  $("key-button").addEventListener("click", () => { $("key-form").hidden = !$("key-form").hidden; });
  $("key-input").value = apiKey;
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    apiKey = $("key-input").value.trim();
    store.set("key", apiKey);
    $("key-form").hidden = true;
    banner(null);
    refreshStatus();
  });
  renderConversation();
  setBusy(false);
  refreshStatus();
  setInterval(() => { if (!document.hidden) refreshStatus(); }, STATUS_EVERY_MS);
}

start();
