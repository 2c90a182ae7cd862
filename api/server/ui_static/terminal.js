// The VM page's terminal: xterm.js on the interactive console WebSocket (docs/console.md).
//
// xterm.js is not part of the repository: hack/install-xterm copies it from the npm registry
// beside this file (xterm.mjs, xterm.css), and the server serves it like every static file.
// It is loaded only when the user connects, so a server without it still shows the rest of
// the page, and says why the terminal is missing.
//
// Binary frames carry the guest's output and the keys typed; the server's text frames are JSON
// notices (attached as writer or reader, read-only, detached), shown beside the buttons.

import { API, enc } from "./dom.js";

const XTERM_MODULE = "./xterm.mjs";
const XTERM_CSS = "/ui/static/xterm.css";
const COLS = 100;
const ROWS = 30;

function consoleSocketURL(project, name) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const path = `${API}/projects/${enc(project)}/qemuvms/${enc(name)}/console?interactive=true`;
  return `${scheme}//${location.host}${path}`;
}

function element(tag, attributes = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) el.setAttribute(key, value);
  el.append(...children);
  return el;
}

function section() {
  const button = (id, text) => element("button", { type: "button", id }, text);
  const disconnect = button("terminal-disconnect", "Disconnect");
  disconnect.disabled = true;
  const readOnly = element("label", {}, element("input", { type: "checkbox", id: "terminal-read-only" }), " read-only");
  return element(
    "section",
    { "aria-labelledby": "h-terminal" },
    element("h2", { id: "h-terminal" }, "Terminal"),
    element(
      "p",
      {},
      button("terminal-connect", "Connect"),
      " ",
      disconnect,
      " ",
      readOnly,
      " ",
      element("output", { id: "terminal-status", role: "status" }),
    ),
    element("div", { id: "terminal", class: "terminal", "aria-label": "Serial console terminal" }),
  );
}

async function loadXterm() {
  if (!document.querySelector(`link[href="${XTERM_CSS}"]`)) {
    const link = document.createElement("link");
    link.rel = "stylesheet";
    link.href = XTERM_CSS;
    document.head.append(link);
  }
  return (await import(XTERM_MODULE)).Terminal;
}

export function startTerminal(project, name) {
  const tail = document.querySelector('section[aria-labelledby="h-console"]');
  if (!tail) return;
  const box = section();
  tail.after(box);
  const status = box.querySelector("#terminal-status");
  const connectButton = box.querySelector("#terminal-connect");
  const disconnectButton = box.querySelector("#terminal-disconnect");
  let terminal = null;
  let socket = null;

  const setStatus = (text) => {
    status.textContent = text;
  };
  const ended = (text) => {
    setStatus(text);
    connectButton.disabled = false;
    disconnectButton.disabled = true;
    socket = null;
  };

  connectButton.addEventListener("click", async () => {
    connectButton.disabled = true;
    let Terminal;
    try {
      Terminal = await loadXterm();
    } catch (err) {
      ended(`The terminal is unavailable: xterm.js is not installed on the server (hack/install-xterm): ${err.message}`);
      return;
    }
    if (!terminal) {
      terminal = new Terminal({ cols: COLS, rows: ROWS, cursorBlink: true, scrollback: 2000 });
      terminal.open(box.querySelector("#terminal"));
      terminal.onData((data) => {
        if (socket && socket.readyState === WebSocket.OPEN) socket.send(new TextEncoder().encode(data));
      });
    }
    const readOnly = box.querySelector("#terminal-read-only").checked;
    setStatus("Connecting…");
    socket = new WebSocket(consoleSocketURL(project, name) + (readOnly ? "&readOnly=true" : ""));
    socket.binaryType = "arraybuffer";
    let reason = "";
    socket.addEventListener("open", () => {
      disconnectButton.disabled = false;
      terminal.focus();
    });
    socket.addEventListener("message", (event) => {
      if (typeof event.data !== "string") {
        terminal.write(new Uint8Array(event.data));
        return;
      }
      let notice = {};
      try {
        notice = JSON.parse(event.data);
      } catch {
        return;
      }
      if (notice.type === "detached") reason = notice.reason;
      else if (notice.message) setStatus(notice.message);
    });
    socket.addEventListener("close", (event) => {
      ended(`Disconnected${reason || event.reason ? `: ${reason || event.reason}` : ""} (code ${event.code})`);
    });
  });
  disconnectButton.addEventListener("click", () => {
    if (socket) socket.close(1000, "the user disconnected");
  });
}
