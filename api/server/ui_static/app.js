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
//
// The parts are ES modules beside this one (dom, http, vm_table, vm_page, actions, fragments).
// fragments.js refreshes the server-rendered overview and charts.

import { AGE_TICK_MS, PAGE, tickAges } from "./dom.js";
import { startFragments } from "./fragments.js";
import "./actions.js"; // wires the action buttons
import { startVMPage } from "./vm_page.js";
import { startVMTable } from "./vm_table.js";

setInterval(tickAges, AGE_TICK_MS);
if (PAGE === "vms" || PAGE === "project") startVMTable();
if (PAGE === "vm") startVMPage();
startFragments();
