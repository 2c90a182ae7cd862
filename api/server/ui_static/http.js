// HTTP: JSON reads, action POSTs, and the list-then-watch loop over newline-delimited JSON events.

import { API, RETRY_MAX_MS, RETRY_MIN_MS, WRITE_HEADERS, body, setLive, sleep } from "./dom.js";

// ---- HTTP -----------------------------------------------------------------------------

class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export async function errorOf(response) {
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

export async function getJSON(path) {
  const response = await fetch(API + path, { headers: { Accept: "application/json" } });
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

export async function post(path, payload) {
  const response = await fetch(API + path, {
    method: "POST",
    headers: WRITE_HEADERS,
    body: JSON.stringify(payload || {}),
  });
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

// ---- The watch ------------------------------------------------------------------------

// List, then watch from the list's resourceVersion; after a drop, resume from the last
// version seen; when that version is gone (410, or an ERROR event saying so), list again.
// `onList(items)` replaces everything; `onEvent(type, object)` applies one change.
export async function listAndWatch(query, onList, onEvent) {
  let version = null;
  let retry = RETRY_MIN_MS;
  for (;;) {
    try {
      if (version === null) {
        const list = await getJSON(`/qemuvms${query ? `?${query}` : ""}`);
        version = list.metadata.resourceVersion;
        onList(list.items);
        changed();
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
        if (event.type !== "BOOKMARK") {
          onEvent(event.type, event.object);
          changed();
        }
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

// Tell the page's other parts (fragments.js) that the VMs changed.
function changed() {
  document.dispatchEvent(new CustomEvent("vms-changed"));
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
