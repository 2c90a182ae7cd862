// tofu-qemu dashboard: upgrades the server-rendered pages. No framework, no build step.
//
// - VM tables (/ui, a project's page) list the QemuVMs, then watch them: a fetch() whose body is
//   read as newline-delimited JSON watch events, resumed after a drop from the last
//   resourceVersion seen, and re-listed when the server says that version expired (410).
// - The VM page follows its VM through the same watch, re-reads its events when it changes, and
//   polls the serial console tail.
// - Actions are POSTs with a JSON body and the X-Requested-By header (the server does not check
//   it; another site could send it only after a CORS preflight, which the server never approves;
//   cross-site writes are refused from Origin/Sec-Fetch-Site); the result is shown in <output>.
//
// Every value is written with textContent, never as HTML. The row text here must match
// api/server/ui_pages.py (vm_row): change both together.
"use strict";

(() => {
  const body = document.body;
  const API = body.dataset.api;
  const PAGE = body.dataset.page;
  const NONE = "\u2014";
  const WRITE_HEADERS = {
    "Content-Type": "application/json",
    "X-Requested-By": "tofu-qemu-ui",
    Accept: "application/json",
  };
  const RETRY_MIN_MS = 1000;
  const RETRY_MAX_MS = 30000;
  const CONSOLE_POLL_MS = 3000;
  const CONSOLE_TAIL_BYTES = 16384;
  const AGE_TICK_MS = 5000;

  const enc = encodeURIComponent;
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  // ---- Formatting (as ui_pages.py) -------------------------------------------------------

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

  function timeElement(iso, suffix = " ago") {
    if (!iso) return document.createTextNode(NONE);
    const el = document.createElement("time");
    el.dateTime = iso;
    el.title = iso;
    el.dataset.age = suffix;
    el.textContent = humanAge((Date.now() - Date.parse(iso)) / 1000) + suffix;
    return el;
  }

  function tickAges() {
    for (const el of document.querySelectorAll("time[data-age]")) {
      const at = Date.parse(el.dateTime);
      if (!Number.isNaN(at)) el.textContent = humanAge((Date.now() - at) / 1000) + el.dataset.age;
    }
  }

  const readyText = (vm) => {
    const ready = (vm.status.conditions || []).find((c) => c.type === "Ready");
    return ready ? ready.status : NONE;
  };
  const phaseText = (vm) =>
    vm.metadata.deletionTimestamp ? `${vm.status.phase} (deleting)` : vm.status.phase;
  const portsText = (vm) =>
    (vm.status.ports || []).map((p) => `${p.hostPort}\u2192${p.guestPort}/${p.protocol}`).join(", ") || NONE;

  function consoleText(raw) {
    return raw
      .replace(/\r\n/g, "\n")
      .replace(/\x1b(\[[0-9;?]*[ -/]*[@-~]|\][^\x07]*\x07|[@-Z\\-_])/g, "")
      .replace(/[\x00-\x08\x0b-\x1f\x7f]/g, "");
  }

  function replaceChildren(el, ...nodes) {
    el.replaceChildren(...nodes);
  }

  function phaseSpan(vm) {
    const span = document.createElement("span");
    span.className = `phase phase-${vm.status.phase}`;
    span.textContent = phaseText(vm);
    return span;
  }

  function link(href, text) {
    const a = document.createElement("a");
    a.href = href;
    a.textContent = text;
    return a;
  }

  const vmHref = (project, name) => `/ui/projects/${enc(project)}/vms/${enc(name)}`;
  const projectHref = (project) => `/ui/projects/${enc(project)}`;

  // ---- Status line and results -----------------------------------------------------------

  function setLive(text, isError = false) {
    const el = document.getElementById("live");
    if (!el) return;
    el.textContent = text;
    el.classList.toggle("error", isError);
  }

  function showResult(text, ok) {
    const out = document.getElementById("action-result");
    if (!out) return;
    out.textContent = text;
    out.className = ok ? "ok" : "error";
  }

  // ---- HTTP ------------------------------------------------------------------------------

  class HttpError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function errorOf(response) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const data = JSON.parse(await response.text());
      if (data && typeof data.message === "string") message = `${response.status}: ${data.message}`;
      else if (data && typeof data.ID === "string") message = `${response.status}: held by lock ${data.ID}`;
    } catch (_) {
      // not JSON: the status line says enough
    }
    return new HttpError(response.status, message);
  }

  async function getJSON(path) {
    const response = await fetch(API + path, { headers: { Accept: "application/json" } });
    if (!response.ok) throw await errorOf(response);
    return response.json();
  }

  async function post(path, payload) {
    const response = await fetch(API + path, {
      method: "POST",
      headers: WRITE_HEADERS,
      body: JSON.stringify(payload || {}),
    });
    if (!response.ok) throw await errorOf(response);
    return response.json();
  }

  // ---- The watch -------------------------------------------------------------------------

  // List, then watch from the list's resourceVersion; after a drop, resume from the last
  // version seen; when that version is gone (410, or an ERROR event saying so), list again.
  // `onList(items)` replaces everything; `onEvent(type, object)` applies one change.
  async function listAndWatch(query, onList, onEvent) {
    let version = null;
    let retry = RETRY_MIN_MS;
    for (;;) {
      try {
        if (version === null) {
          const list = await getJSON(`/qemuvms${query ? `?${query}` : ""}`);
          version = list.metadata.resourceVersion;
          onList(list.items);
        }
        const params = new URLSearchParams(query);
        params.set("watch", "true");
        params.set("allowWatchBookmarks", "true");
        params.set("resourceVersion", version);
        const response = await fetch(`${API}/qemuvms?${params}`, { headers: { Accept: "application/json" } });
        if (response.status === 410) {
          version = null;
          continue;
        }
        if (!response.ok) throw await errorOf(response);
        setLive("Live: changes appear as they happen.");
        retry = RETRY_MIN_MS;
        const expired = await readEvents(response, (event) => {
          const meta = event.object && event.object.metadata;
          if (meta && meta.resourceVersion) version = meta.resourceVersion;
          if (event.type !== "BOOKMARK") onEvent(event.type, event.object);
        });
        if (expired) version = null;
        // The server ends a watch after its timeout: resume at once (a little later if it
        // keeps ending them straight away).
        await sleep(200);
      } catch (err) {
        setLive(`Disconnected (${err.message}); retrying in ${Math.round(retry / 1000)} s\u2026`, true);
        await sleep(retry);
        retry = Math.min(retry * 2, RETRY_MAX_MS);
      }
    }
  }

  // Feed each NDJSON line of the response to `handle`. Returns true when the server said the
  // version expired (an ERROR event with a 410 Status), which ends the stream.
  async function readEvents(response, handle) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return false;
      buffer += decoder.decode(value, { stream: true });
      let newline;
      while ((newline = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, newline).trim();
        buffer = buffer.slice(newline + 1);
        if (!line) continue;
        const event = JSON.parse(line);
        if (event.type === "ERROR") {
          await reader.cancel();
          if (event.object && event.object.code === 410) return true;
          throw new Error((event.object && event.object.message) || "watch error");
        }
        handle(event);
      }
    }
  }

  // ---- VM tables -------------------------------------------------------------------------

  function vmCells(vm) {
    const meta = vm.metadata;
    const restart = document.createElement("button");
    restart.type = "button";
    restart.dataset.action = "restart";
    restart.dataset.project = meta.project;
    restart.dataset.name = meta.name;
    restart.setAttribute("aria-label", `Restart ${meta.name}`);
    restart.textContent = "Restart";
    return {
      name: link(vmHref(meta.project, meta.name), meta.name),
      project: link(projectHref(meta.project), meta.project),
      phase: phaseSpan(vm),
      ready: document.createTextNode(readyText(vm)),
      accel: document.createTextNode(vm.status.accel || NONE),
      ports: document.createTextNode(portsText(vm)),
      restarts: document.createTextNode(String(vm.status.restarts)),
      age: timeElement(meta.creationTimestamp, ""),
      actions: restart,
    };
  }

  function fillRow(row, vm) {
    const meta = vm.metadata;
    row.dataset.uid = meta.uid;
    row.dataset.project = meta.project;
    row.dataset.name = meta.name;
    row.dataset.resourceVersion = meta.resourceVersion;
    const cells = vmCells(vm);
    for (const [col, node] of Object.entries(cells)) {
      let td = row.querySelector(`td[data-col="${col}"]`);
      if (!td) {
        td = document.createElement("td");
        td.dataset.col = col;
        row.append(td);
      }
      // Rewrite a cell only when its text changes, so a focused button survives updates.
      if (col === "actions" && td.firstChild) continue;
      if (td.textContent !== node.textContent || col === "name" || col === "project") replaceChildren(td, node);
    }
  }

  class VMTable {
    constructor(table) {
      this.tbody = table.tBodies[0];
      this.columns = table.tHead.rows[0].cells.length;
      this.emptyText = (this.tbody.querySelector("tr.empty td") || {}).textContent || "No VMs.";
    }

    rowOf(uid) {
      return this.tbody.querySelector(`tr[data-uid="${CSS.escape(uid)}"]`);
    }

    replaceAll(items) {
      const rows = items.map((vm) => {
        const row = this.rowOf(vm.metadata.uid) || document.createElement("tr");
        fillRow(row, vm);
        return row;
      });
      replaceChildren(this.tbody, ...rows);
      this.showEmpty();
    }

    apply(type, vm) {
      const existing = this.rowOf(vm.metadata.uid);
      if (type === "DELETED") {
        if (existing) existing.remove();
        this.showEmpty();
        return;
      }
      const row = existing || document.createElement("tr");
      fillRow(row, vm);
      if (!existing) this.insertSorted(row);
      row.classList.remove("updated");
      void row.offsetWidth; // restart the highlight animation
      row.classList.add("updated");
      this.showEmpty();
    }

    insertSorted(row) {
      const key = `${row.dataset.project}/${row.dataset.name}`;
      const next = [...this.tbody.rows].find(
        (other) => other.dataset.uid && `${other.dataset.project}/${other.dataset.name}` > key,
      );
      this.tbody.insertBefore(row, next || null);
    }

    showEmpty() {
      const placeholder = this.tbody.querySelector("tr.empty");
      const hasRows = [...this.tbody.rows].some((row) => row.dataset.uid);
      if (hasRows && placeholder) placeholder.remove();
      if (!hasRows && !placeholder) {
        const row = document.createElement("tr");
        row.className = "empty";
        const td = document.createElement("td");
        td.colSpan = this.columns;
        td.textContent = this.emptyText;
        row.append(td);
        this.tbody.append(row);
      }
    }
  }

  function startVMTable() {
    const tableEl = document.getElementById("vms");
    if (!tableEl) return;
    const table = new VMTable(tableEl);
    const project = body.dataset.project;
    const query = project ? `project=${enc(project)}` : "";
    listAndWatch(
      query,
      (items) => table.replaceAll(items),
      (type, vm) => table.apply(type, vm),
    );
  }

  // ---- The VM page -----------------------------------------------------------------------

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
  async function copyText(button) {
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

  function vmPath(project, name) {
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

  function startVMPage() {
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
  }

  // ---- Actions ---------------------------------------------------------------------------

  async function vmAction(button) {
    const { action, project, name } = button.dataset;
    button.disabled = true;
    showResult(`${action} ${name}: sending\u2026`, true);
    try {
      const vm = await post(`${vmPath(project, name)}/${action}`, {});
      showResult(
        `${action} ${name}: requested (phase ${vm.status.phase}, restarts ${vm.status.restarts}).`,
        true,
      );
    } catch (err) {
      showResult(`${action} ${name} failed: ${err.message}`, false);
    } finally {
      button.disabled = false;
    }
  }

  async function forceUnlock(button) {
    const { project, lockId, lockWho } = button.dataset;
    const question =
      `Force-unlock project "${project}"?\n\nLock ID: ${lockId}\nHeld by: ${lockWho}\n\n` +
      "Only do this when that run is dead: two runs writing one state lose changes.";
    if (!window.confirm(question)) return;
    button.disabled = true;
    try {
      // The ID makes the server refuse if a newer lock has replaced the one shown.
      await post(`/projects/${enc(project)}/force-unlock`, { id: lockId });
      showResult(`Project ${project}: lock ${lockId} released.`, true);
      const cell = button.closest('td[data-col="lock"]');
      if (cell) cell.textContent = NONE;
      else button.replaceWith(document.createTextNode("Released."));
    } catch (err) {
      button.disabled = false;
      showResult(`Force-unlock of ${project} failed: ${err.message}`, false);
    }
  }

  document.addEventListener("click", (event) => {
    const copy = event.target.closest("button[data-copy]");
    if (copy) copyText(copy);
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    if (button.dataset.action === "force-unlock") forceUnlock(button);
    else vmAction(button);
  });

  // ---- Start -----------------------------------------------------------------------------

  setInterval(tickAges, AGE_TICK_MS);
  if (PAGE === "vms" || PAGE === "project") startVMTable();
  if (PAGE === "vm") startVMPage();
})();
