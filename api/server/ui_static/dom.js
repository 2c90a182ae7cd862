// Page constants, the formatters (the same text as api/server/ui_pages.py) and the status line.

export const body = document.body;
export const API = body.dataset.api;
export const PAGE = body.dataset.page;
export const NONE = "\u2014";
export const WRITE_HEADERS = {
  "Content-Type": "application/json",
  "X-Requested-By": "tofu-qemu-ui",
  Accept: "application/json",
};
export const RETRY_MIN_MS = 1000;
export const RETRY_MAX_MS = 30000;
export const CONSOLE_POLL_MS = 3000;
export const CONSOLE_TAIL_BYTES = 16384;
export const AGE_TICK_MS = 5000;

export const enc = encodeURIComponent;
export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// ---- Formatting (as ui_pages.py) ------------------------------------------------------

function humanAge(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  const m = Math.floor(s / 60);
  const h = Math.floor(s / 3600);
  const d = Math.floor(s / 86400);
  if (s < 120) return `${s}s`;
  if (m < 10) return s % 60 ? `${m}m${s % 60}s` : `${m}m`;
  if (h < 3) return `${m}m`;
  if (h < 8) return m % 60 ? `${h}h${m % 60}m` : `${h}h`;
  if (h < 48) return `${h}h`;
  if (d < 8) return h % 24 ? `${d}d${h % 24}h` : `${d}d`;
  return `${d}d`;
}

export function timeElement(iso, suffix = " ago") {
  if (!iso) return document.createTextNode(NONE);
  const el = document.createElement("time");
  el.dateTime = iso;
  el.title = iso;
  el.dataset.age = suffix;
  el.textContent = humanAge((Date.now() - Date.parse(iso)) / 1000) + suffix;
  return el;
}

export function tickAges() {
  for (const el of document.querySelectorAll("time[data-age]")) {
    const at = Date.parse(el.dateTime);
    if (!Number.isNaN(at)) el.textContent = humanAge((Date.now() - at) / 1000) + el.dataset.age;
  }
}

export const readyText = (vm) => {
  const ready = (vm.status.conditions || []).find((c) => c.type === "Ready");
  return ready ? ready.status : NONE;
};
export const phaseText = (vm) =>
  vm.metadata.deletionTimestamp ? `${vm.status.phase} (deleting)` : vm.status.phase;
export const portsText = (vm) =>
  (vm.status.ports || []).map((p) => `${p.hostPort}\u2192${p.guestPort}/${p.protocol}`).join(", ") || NONE;

export function consoleText(raw) {
  return raw
    .replace(/\r\n/g, "\n")
    .replace(/\x1b(\[[0-9;?]*[ -/]*[@-~]|\][^\x07]*\x07|[@-Z\\-_])/g, "")
    .replace(/[\x00-\x08\x0b-\x1f\x7f]/g, "");
}

export function replaceChildren(el, ...nodes) {
  el.replaceChildren(...nodes);
}

export function phaseSpan(vm) {
  const span = document.createElement("span");
  span.className = `phase phase-${vm.status.phase}`;
  span.textContent = phaseText(vm);
  return span;
}

export function link(href, text) {
  const a = document.createElement("a");
  a.href = href;
  a.textContent = text;
  return a;
}

export const vmHref = (project, name) => `/ui/projects/${enc(project)}/vms/${enc(name)}`;
export const projectHref = (project) => `/ui/projects/${enc(project)}`;

// ---- Status line and results ----------------------------------------------------------

export function setLive(text, isError = false) {
  const el = document.getElementById("live");
  if (!el) return;
  el.textContent = text;
  el.classList.toggle("error", isError);
}

export function showResult(text, ok) {
  const out = document.getElementById("action-result");
  if (!out) return;
  out.textContent = text;
  out.className = ok ? "ok" : "error";
}
