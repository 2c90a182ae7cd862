// The VM page: the VM through the same watch, its events, and the serial console tail.

import {
  API,
  CONSOLE_POLL_MS,
  CONSOLE_TAIL_BYTES,
  NONE,
  body,
  consoleText,
  enc,
  link,
  phaseText,
  portsText,
  readyText,
  replaceChildren,
  setLive,
  timeElement,
} from "./dom.js";
import { errorOf, getJSON, listAndWatch } from "./http.js";
import { startTerminal } from "./terminal.js";

function setField(name, node) {
  const el = document.querySelector(`[data-field="${name}"]`);
  if (!el) return;
  const next = typeof node === "string" ? document.createTextNode(node) : node;
  if (el.textContent !== next.textContent) replaceChildren(el, next);
}

function lastExitNode(lastExit) {
  if (!lastExit) return document.createTextNode(NONE);
  const span = document.createElement("span");
  let detail = lastExit.exitCode !== null && lastExit.exitCode !== undefined ? `code ${lastExit.exitCode}` : "";
  if (lastExit.signal !== null && lastExit.signal !== undefined) detail = `signal ${lastExit.signal}`;
  span.append([lastExit.reason, detail, lastExit.message].filter(Boolean).join(" "), " ", timeElement(lastExit.at));
  return span;
}

function overrideNode(override) {
  if (!override) return document.createTextNode(NONE);
  const span = document.createElement("span");
  span.append(override.stopped ? "held stopped" : "running");
  if (override.restartRequestedAt) span.append(", restart requested ", timeElement(override.restartRequestedAt));
  if (override.pauseRequestedAt) span.append(", pause requested ", timeElement(override.pauseRequestedAt));
  span.append(` by ${override.requestedBy || NONE}`);
  return span;
}

function conditionRows(conditions) {
  return conditions.map((c) => {
    const row = document.createElement("tr");
    for (const value of [c.type, c.status, c.reason, c.message || ""]) {
      const td = document.createElement("td");
      td.textContent = value;
      row.append(td);
    }
    const td = document.createElement("td");
    td.append(timeElement(c.lastTransitionTime));
    row.append(td);
    return row;
  });
}

function eventRows(events) {
  return events.map((e) => {
    const row = document.createElement("tr");
    const time = document.createElement("td");
    time.append(timeElement(e.time));
    row.append(time);
    for (const value of [e.type, e.reason, e.message]) {
      const td = document.createElement("td");
      td.textContent = value;
      row.append(td);
    }
    const trace = document.createElement("td");
    trace.append(...traceCell(e.traceId, e.traceUrl));
    row.append(trace);
    return row;
  });
}

// As trace_cell in ui_pages.py: the server built traceUrl from a validated id and template.
function traceCell(traceId, traceUrl) {
  if (!traceId) return [NONE];
  const code = document.createElement("code");
  code.textContent = traceId;
  if (traceUrl) {
    const link = document.createElement("a");
    link.className = "trace";
    link.href = traceUrl;
    link.rel = "noopener noreferrer";
    link.target = "_blank";
    link.append(code);
    return [link];
  }
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "copy";
  copy.dataset.copy = traceId;
  copy.textContent = "Copy";
  return [code, " ", copy];
}

// The clipboard API exists only in secure contexts (https, localhost); elsewhere the id is
// selected so that Ctrl+C copies it.
export async function copyText(button) {
  try {
    await navigator.clipboard.writeText(button.dataset.copy);
    button.textContent = "Copied";
  } catch (_err) {
    const code = button.previousElementSibling;
    if (code) window.getSelection().selectAllChildren(code);
    button.textContent = "Selected";
  }
}

function fillTable(id, rows, emptyText) {
  const table = document.getElementById(id);
  if (!table) return;
  const tbody = table.tBodies[0];
  if (rows.length === 0) {
    const row = document.createElement("tr");
    row.className = "empty";
    const td = document.createElement("td");
    td.colSpan = table.tHead.rows[0].cells.length;
    td.textContent = emptyText;
    row.append(td);
    rows = [row];
  }
  replaceChildren(tbody, ...rows);
}

function showVM(vm) {
  const s = vm.status;
  const phase = document.querySelector('[data-field="phase"]');
  if (phase) {
    phase.textContent = phaseText(vm);
    phase.className = `phase phase-${s.phase}`;
  }
  setField("ready", readyText(vm));
  setField("restarts", String(s.restarts));
  setField("failures", String(s.failures));
  setField("pid", s.pid === null || s.pid === undefined ? NONE : String(s.pid));
  setField("accel", s.accel || NONE);
  setField("ports", portsText(vm));
  setField("startedAt", timeElement(s.startedAt));
  setField("lastExit", lastExitNode(s.lastExit));
  setField("nextRetryAt", timeElement(s.nextRetryAt));
  setField("override", overrideNode(s.override));
  setField("generation", String(vm.metadata.generation));
  setField("observedGeneration", String(s.observedGeneration));
  fillTable("conditions", conditionRows(s.conditions || []), "None.");
  const spec = document.getElementById("spec");
  if (spec) spec.textContent = JSON.stringify(vm.spec, Object.keys(flatKeys(vm.spec)).sort(), 2);
}

// Every key at any depth, so JSON.stringify's replacer list keeps all of them (sorted, as
// the server renders the spec).
function flatKeys(value, keys = {}) {
  if (value && typeof value === "object") {
    for (const [k, v] of Object.entries(value)) {
      if (!Array.isArray(value)) keys[k] = true;
      flatKeys(v, keys);
    }
  }
  return keys;
}

export function vmPath(project, name) {
  return `/projects/${enc(project)}/qemuvms/${enc(name)}`;
}

async function refreshEvents(project, name) {
  try {
    const data = await getJSON(`${vmPath(project, name)}/events`);
    fillTable("events", eventRows(data.items), "No events recorded.");
  } catch (err) {
    setLive(`Events could not be read: ${err.message}`, true);
  }
}

async function refreshConsole(project, name) {
  const pre = document.getElementById("console");
  if (!pre) return;
  try {
    const response = await fetch(`${API}${vmPath(project, name)}/console?tailBytes=${CONSOLE_TAIL_BYTES}`, {
      headers: { Accept: "text/plain" },
    });
    if (response.status === 404) {
      pre.textContent = "(no console output: the VM has not started)";
      return;
    }
    if (!response.ok) throw await errorOf(response);
    const text = consoleText(await response.text());
    const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    if (pre.textContent !== text) {
      pre.textContent = text;
      if (atBottom) pre.scrollTop = pre.scrollHeight;
    }
  } catch (err) {
    pre.dataset.error = err.message;
  }
}

export function startVMPage() {
  const { project, name } = body.dataset;
  let uid = body.dataset.uid;
  let eventsTimer = null;
  const refreshEventsSoon = () => {
    clearTimeout(eventsTimer);
    eventsTimer = setTimeout(() => refreshEvents(project, name), 300);
  };
  listAndWatch(
    `project=${enc(project)}`,
    (items) => {
      const vm = items.find((item) => item.metadata.name === name && !item.metadata.deletionTimestamp)
        || items.find((item) => item.metadata.name === name);
      if (vm) {
        uid = vm.metadata.uid;
        showVM(vm);
      }
      refreshEventsSoon();
    },
    (type, vm) => {
      if (vm.metadata.name !== name) return;
      if (type === "DELETED") {
        if (vm.metadata.uid === uid) setLive("This VM was deleted.", true);
        return;
      }
      uid = vm.metadata.uid;
      showVM(vm);
      refreshEventsSoon();
    },
  );
  const follow = document.getElementById("console-follow");
  document.getElementById("console-refresh").addEventListener("click", () => refreshConsole(project, name));
  const poll = async () => {
    if (follow.checked && !document.hidden) await refreshConsole(project, name);
    setTimeout(poll, CONSOLE_POLL_MS);
  };
  const pre = document.getElementById("console");
  pre.scrollTop = pre.scrollHeight;
  poll();
  startTerminal(project, name);
}
