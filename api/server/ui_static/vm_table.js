// The VM tables (/ui, a project's page): listed, then kept live through the watch.

import {
  NONE,
  body,
  enc,
  link,
  phaseSpan,
  portsText,
  projectHref,
  readyText,
  replaceChildren,
  timeElement,
  vmHref,
} from "./dom.js";
import { listAndWatch } from "./http.js";

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

export function startVMTable() {
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
