"""The dashboard's HTML, rendered from typed objects. Pure: no I/O, `now` is an argument.

Invariants:
- Every value that reaches the page goes through `_e` (html.escape with quotes), in text and in
  attributes alike. Lock info is arbitrary client JSON, labels and console text are free text:
  none of it is ever trusted. URLs are built from path segments quoted with `_seg`.
- No inline script or style: the pages load the module /ui/static/app.js (which imports its
  parts from the same folder) and style.css only, so the
  Content-Security-Policy `default-src 'self'` holds. The script finds what it needs in
  `data-*` attributes.
- The first paint is complete without JavaScript; the script upgrades it (live rows, actions).
  The list columns here and `vmCells` in vm_table.js compute the same text: change both together.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from urllib.parse import quote

from api.humanize import human_duration
from api.store.events import EventRecord
from api.store.states import HeldLock, ProjectInfo, VersionInfo
from api.tracelinks import trace_url
from api.types import Condition, QemuVM

STATIC = "/ui/static"
K8S_API = "/apis/tofu-qemu.dev/v1alpha1"
VM_COLUMNS = ("NAME", "PROJECT", "PHASE", "READY", "ACCEL", "PORTS", "RESTARTS", "AGE")
NONE = "—"
_ANSI_RE = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|\][^\x07]*\x07|[@-Z\\-_])")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _seg(value: str) -> str:
    return quote(value, safe="")


def vm_href(project: str, name: str) -> str:
    return f"/ui/projects/{_seg(project)}/vms/{_seg(name)}"


def project_href(project: str) -> str:
    return f"/ui/projects/{_seg(project)}"


# ---- Small formatters (dom.js has the same; ages come from api/humanize.py) ---------------


def _time(at: datetime | None, *, now: datetime, suffix: str = " ago") -> str:
    """A <time> with the ISO instant as its machine value and title, and the age as text.
    dom.js keeps the age current (data-age holds the suffix)."""
    if at is None:
        return NONE
    iso = at.isoformat()
    age = human_duration(now - at)
    return f'<time datetime="{_e(iso)}" title="{_e(iso)}" data-age="{_e(suffix)}">{_e(age + suffix)}</time>'


def ports_text(vm: QemuVM) -> str:
    return ", ".join(f"{p.host_port}→{p.guest_port}/{p.protocol}" for p in vm.status.ports) or NONE


def ready_text(vm: QemuVM) -> str:
    ready = [c for c in vm.status.conditions if c.type == "Ready"]
    return ready[0].status.value if ready else NONE


def phase_text(vm: QemuVM) -> str:
    return f"{vm.status.phase.value} (deleting)" if vm.metadata.deletion_timestamp else vm.status.phase.value


# ---- Layout --------------------------------------------------------------------------------


def layout(title: str, body: str, *, page: str, data: Mapping[str, str] | None = None) -> str:
    attrs = "".join(f' data-{key}="{_e(value)}"' for key, value in (data or {}).items())
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)} · tofu-qemu</title>
<link rel="icon" href="{STATIC}/favicon.svg" type="image/svg+xml">
<link rel="stylesheet" href="{STATIC}/style.css">
<script type="module" src="{STATIC}/app.js"></script>
</head>
<body data-page="{_e(page)}" data-api="{K8S_API}"{attrs}>
<header>
<nav aria-label="Main"><a class="brand" href="/ui">tofu-qemu</a>
<a href="/ui"{_current(page == "vms")}>VMs</a>
<a href="/ui/projects"{_current(page.startswith("project"))}>Projects</a></nav>
</header>
<main>
{body}
</main>
</body>
</html>
"""


def _current(is_current: bool) -> str:
    return ' aria-current="page"' if is_current else ""


def _table(
    caption: str,
    headers: Sequence[str],
    rows: Iterable[str],
    *,
    table_id: str = "",
    empty: str = "None.",
) -> str:
    head = "".join(f'<th scope="col">{_e(h)}</th>' for h in headers)
    body = "".join(rows) or f'<tr class="empty"><td colspan="{len(headers)}">{_e(empty)}</td></tr>'
    ident = f' id="{_e(table_id)}"' if table_id else ""
    return (
        f"<table{ident}><caption>{_e(caption)}</caption>"
        f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    )


def _dl(items: Iterable[tuple[str, str]]) -> str:
    """A definition list; values are HTML already escaped by the caller."""
    return "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"


def _status_line() -> str:
    return '<p id="live" class="live" role="status" aria-live="polite">Static view: reload for news.</p>'


def _noscript() -> str:
    return "<noscript><p>Live updates and actions need JavaScript; this view is as of loading.</p></noscript>"


# ---- The VM list ----------------------------------------------------------------------------


def vm_row(vm: QemuVM, *, now: datetime) -> str:
    meta, status = vm.metadata, vm.status
    name = f'<a href="{_e(vm_href(meta.project, meta.name))}">{_e(meta.name)}</a>'
    cells = {
        "name": name,
        "project": f'<a href="{_e(project_href(meta.project))}">{_e(meta.project)}</a>',
        "phase": f'<span class="phase phase-{_e(status.phase.value)}">{_e(phase_text(vm))}</span>',
        "ready": _e(ready_text(vm)),
        "accel": _e(status.accel.value if status.accel else NONE),
        "ports": _e(ports_text(vm)),
        "restarts": _e(status.restarts),
        "age": _time(meta.creation_timestamp, now=now, suffix=""),
    }
    tds = "".join(f'<td data-col="{col}">{value}</td>' for col, value in cells.items())
    action = (
        f'<td data-col="actions"><button type="button" data-action="restart"'
        f' data-project="{_e(meta.project)}" data-name="{_e(meta.name)}"'
        f' aria-label="Restart {_e(meta.name)}">Restart</button></td>'
    )
    return (
        f'<tr data-uid="{_e(meta.uid)}" data-project="{_e(meta.project)}" data-name="{_e(meta.name)}"'
        f' data-resource-version="{_e(meta.resource_version)}">{tds}{action}</tr>'
    )


def vm_list_page(vms: Sequence[QemuVM], *, now: datetime, overview: str = "") -> str:
    table = _table(
        "QemuVMs, live",
        (*VM_COLUMNS, "ACTIONS"),
        (vm_row(vm, now=now) for vm in vms),
        table_id="vms",
        empty="No VMs yet: apply a configuration that declares some.",
    )
    body = (
        f"<h1>VMs</h1>{_status_line()}{_noscript()}{overview}{table}"
        '<p><output id="action-result" role="status"></output></p>'
    )
    return layout("VMs", body, page="vms")


# ---- One VM ---------------------------------------------------------------------------------


def _json_pre(value: object, *, ident: str) -> str:
    text = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)
    return f'<pre id="{_e(ident)}">{_e(text)}</pre>'


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return NONE
    return (
        "<ul class='labels'>"
        + "".join(f"<li><code>{_e(k)}={_e(v)}</code></li>" for k, v in labels.items())
        + "</ul>"
    )


def condition_row(condition: Condition, *, now: datetime) -> str:
    return (
        f"<tr><td>{_e(condition.type)}</td><td>{_e(condition.status.value)}</td><td>{_e(condition.reason)}</td>"
        f"<td>{_e(condition.message)}</td><td>{_time(condition.last_transition_time, now=now)}</td></tr>"
    )


def trace_cell(trace_id: str | None, template: str | None) -> str:
    """A link to the trace when there is a template (eventRows in vm_page.js builds the same),
    else the id with a Copy button that actions.js wires up."""
    if not trace_id:
        return NONE
    url = trace_url(template, trace_id)
    if url is not None:
        return (
            f'<a class="trace" href="{_e(url)}" rel="noopener noreferrer" target="_blank">'
            f"<code>{_e(trace_id)}</code></a>"
        )
    button = f'<button type="button" class="copy" data-copy="{_e(trace_id)}">Copy</button>'
    return f"<code>{_e(trace_id)}</code> {button}"


def event_row(event: EventRecord, *, now: datetime, trace_template: str | None = None) -> str:
    return (
        f"<tr><td>{_time(event.time, now=now)}</td><td>{_e(event.type.value)}</td><td>{_e(event.reason)}</td>"
        f"<td>{_e(event.message)}</td><td>{trace_cell(event.trace_id, trace_template)}</td></tr>"
    )


def _events_table(
    title: str, events: Sequence[EventRecord], *, now: datetime, trace_template: str | None
) -> str:
    return _table(
        title,
        ("TIME", "TYPE", "REASON", "MESSAGE", "TRACE"),
        (event_row(e, now=now, trace_template=trace_template) for e in events),
        table_id="events",
        empty="No events recorded.",
    )


def _vm_summary(vm: QemuVM, *, now: datetime) -> str:
    meta, status = vm.metadata, vm.status
    last_exit = status.last_exit
    exit_text = NONE
    if last_exit is not None:
        detail = f"code {last_exit.exit_code}" if last_exit.exit_code is not None else ""
        detail = f"signal {last_exit.signal}" if last_exit.signal is not None else detail
        exit_text = _e(" ".join(p for p in (last_exit.reason.value, detail, last_exit.message) if p))
        exit_text += " " + _time(last_exit.at, now=now)
    override = status.override
    override_text = NONE
    if override is not None:
        wanted = "held stopped" if override.stopped else "running"
        restart = f", restart requested {_time(override.restart_requested_at, now=now)}"
        pause = f", pause requested {_time(override.pause_requested_at, now=now)}"
        override_text = (
            f"{_e(wanted)}{restart if override.restart_requested_at else ''}"
            f"{pause if override.pause_requested_at else ''}"
            f" by {_e(override.requested_by or NONE)}"
        )
    fields = [
        (
            "Phase",
            f'<span data-field="phase" class="phase phase-{_e(status.phase.value)}">'
            f"{_e(phase_text(vm))}</span>",
        ),
        ("Ready", f'<span data-field="ready">{_e(ready_text(vm))}</span>'),
        ("Restarts", f'<span data-field="restarts">{_e(status.restarts)}</span>'),
        ("Failures", f'<span data-field="failures">{_e(status.failures)}</span>'),
        ("PID", f'<span data-field="pid">{_e(status.pid if status.pid is not None else NONE)}</span>'),
        (
            "Accelerator",
            f'<span data-field="accel">{_e(status.accel.value if status.accel else NONE)}</span>',
        ),
        ("Ports", f'<span data-field="ports">{_e(ports_text(vm))}</span>'),
        ("Started", f'<span data-field="startedAt">{_time(status.started_at, now=now)}</span>'),
        ("Last exit", f'<span data-field="lastExit">{exit_text}</span>'),
        ("Next retry", f'<span data-field="nextRetryAt">{_time(status.next_retry_at, now=now)}</span>'),
        ("Requested", f'<span data-field="override">{override_text}</span>'),
        (
            "Generation",
            f'<span data-field="generation">{_e(meta.generation)}</span> (observed: '
            f'<span data-field="observedGeneration">{_e(status.observed_generation)}</span>)',
        ),
        ("Project", f'<a href="{_e(project_href(meta.project))}">{_e(meta.project)}</a>'),
        ("UID", f"<code>{_e(meta.uid)}</code>"),
        ("Created", _time(meta.creation_timestamp, now=now)),
        ("Deleting since", _time(meta.deletion_timestamp, now=now)),
        ("Labels", _labels(meta.labels)),
        ("Annotations", _labels(meta.annotations)),
        ("State serial", _e(meta.state_serial)),
    ]
    return _dl(fields)


def console_text(raw: str) -> str:
    """Serial output made readable: terminal escapes and control characters other than
    newline and tab removed (dom.js does the same). Escaping for HTML is the caller's."""
    return _CONTROL_RE.sub("", _ANSI_RE.sub("", raw.replace("\r\n", "\n")))


def vm_page(
    vm: QemuVM,
    events: Sequence[EventRecord],
    *,
    console: str | None,
    now: datetime,
    trace_template: str | None = None,
    charts: str = "",
) -> str:
    meta = vm.metadata
    console_shown = (
        console_text(console) if console is not None else "(no console output: the VM has not started)"
    )
    actions = "".join(
        f'<button type="button" data-action="{a}" data-project="{_e(meta.project)}"'
        f' data-name="{_e(meta.name)}">{a.capitalize()}</button>'
        for a in ("restart", "stop", "start", "pause", "unpause")
    )
    conditions = _table(
        "Conditions",
        ("TYPE", "STATUS", "REASON", "MESSAGE", "LAST TRANSITION"),
        (condition_row(c, now=now) for c in vm.status.conditions),
        table_id="conditions",
    )
    events_table = _events_table("Events (oldest first)", events, now=now, trace_template=trace_template)
    body = f"""<h1>VM <span class="name">{_e(meta.name)}</span> <small>in {_e(meta.project)}</small></h1>
{_status_line()}{_noscript()}
<section aria-labelledby="h-actions"><h2 id="h-actions">Actions</h2>
<p class="actions">{actions}</p>
<p><output id="action-result" role="status"></output></p></section>
<section aria-labelledby="h-status"><h2 id="h-status">Status</h2>{_vm_summary(vm, now=now)}</section>
{charts}
<section aria-labelledby="h-conditions"><h2 id="h-conditions">Conditions</h2>{conditions}</section>
<section aria-labelledby="h-events"><h2 id="h-events">Events</h2>{events_table}</section>
<section aria-labelledby="h-console"><h2 id="h-console">Serial console (tail)</h2>
<p><button type="button" id="console-refresh">Refresh</button>
<label><input type="checkbox" id="console-follow" checked> refresh every few seconds</label></p>
<pre id="console" class="console" tabindex="0" aria-label="Serial console output">{_e(console_shown)}</pre>
</section>
<section aria-labelledby="h-spec"><h2 id="h-spec">Spec</h2>{_json_pre(vm.spec, ident="spec")}</section>
"""
    data = {"project": meta.project, "name": meta.name, "uid": meta.uid}
    return layout(f"{meta.name} ({meta.project})", body, page="vm", data=data)


# ---- Projects -------------------------------------------------------------------------------


def lock_holder(lock: HeldLock) -> str:
    info = lock.info
    who, operation = info.get("Who") or NONE, info.get("Operation") or NONE
    return f"{who} ({operation})"


def _force_unlock_button(project: str, lock: HeldLock) -> str:
    lock_id = str(lock.info.get("ID", ""))
    return (
        f'<button type="button" class="danger" data-action="force-unlock" data-project="{_e(project)}"'
        f' data-lock-id="{_e(lock_id)}" data-lock-who="{_e(lock_holder(lock))}"'
        f' aria-label="Force-unlock {_e(project)}">Force unlock</button>'
    )


def _lock_cell(project: str, lock: HeldLock | None, *, now: datetime) -> str:
    if lock is None:
        return NONE
    return (
        f'<span class="lock">{_e(lock_holder(lock))}, <code>{_e(lock.info.get("ID", ""))}</code>,'
        f" locked {_time(lock.locked_at, now=now)}</span> {_force_unlock_button(project, lock)}"
    )


def projects_page(projects: Sequence[ProjectInfo], *, now: datetime) -> str:
    rows = (
        f'<tr data-project="{_e(p.name)}"><td><a href="{_e(project_href(p.name))}">{_e(p.name)}</a></td>'
        f"<td>{_e(p.serial if p.serial is not None else NONE)}</td><td>{_e(p.vm_count)}</td>"
        f"<td>{_e(p.version_count)}</td>"
        f'<td data-col="lock">{_lock_cell(p.name, p.lock, now=now)}</td></tr>'
        for p in projects
    )
    table = _table(
        "Projects", ("NAME", "SERIAL", "VMS", "VERSIONS", "LOCK"), rows, table_id="projects",
        empty="No projects yet: point a Terraform http backend here and apply.",
    )  # fmt: skip
    body = f'<h1>Projects</h1>{_noscript()}{table}<p><output id="action-result" role="status"></output></p>'
    return layout("Projects", body, page="projects")


def version_row(version: VersionInfo, *, now: datetime) -> str:
    serial = version.serial if version.serial is not None else NONE
    return (
        f"<tr><td>{_e(serial)}</td><td>{_e(version.lock_who or NONE)}</td>"
        f"<td>{_e(version.lock_operation or NONE)}</td>"
        f"<td>{_time(version.created_at, now=now)}</td><td>{_e(version.size)}</td>"
        f"<td><code>{_e(version.md5)}</code></td></tr>"
    )


def _lock_section(project: ProjectInfo, *, now: datetime) -> str:
    lock = project.lock
    if lock is None:
        return "<p>Not locked.</p>"
    fields = [(str(key), _e(v if isinstance(v, str) else json.dumps(v))) for key, v in lock.info.items()]
    fields.append(("Locked", _time(lock.locked_at, now=now)))
    return _dl(fields) + f"<p>{_force_unlock_button(project.name, lock)}</p>"


def project_page(
    project: ProjectInfo,
    versions: Sequence[VersionInfo],
    vms: Sequence[QemuVM],
    events: Sequence[EventRecord],
    *,
    now: datetime,
    trace_template: str | None = None,
) -> str:
    summary = _dl(
        [
            ("Serial", _e(project.serial if project.serial is not None else NONE)),
            ("Lineage", f"<code>{_e(project.lineage or NONE)}</code>"),
            (
                "Published serial",
                _e(project.published_serial if project.published_serial is not None else NONE),
            ),
            ("Pending serial", _e(project.pending_serial if project.pending_serial is not None else NONE)),
            ("Specs", _e(project.specs_note or "readable")),
        ]
    )
    problems = (
        ""
        if not project.problems
        else _table(
            "Manifests that are not VMs",
            ("ADDRESS", "PROBLEM"),
            (
                f"<tr><td><code>{_e(p.address)}</code></td><td>{_e(p.message)}</td></tr>"
                for p in project.problems
            ),
        )
    )
    versions_table = _table(
        "State versions, newest first",
        ("SERIAL", "WHO", "OPERATION", "TIME", "BYTES", "MD5"),
        (version_row(v, now=now) for v in versions),
        table_id="versions",
    )
    vm_table = _table(
        "VMs", (*VM_COLUMNS, "ACTIONS"), (vm_row(vm, now=now) for vm in vms), table_id="vms", empty="No VMs."
    )
    events_table = _events_table(
        "Events of the project itself (force-unlocks), oldest first",
        events,
        now=now,
        trace_template=trace_template,
    )
    body = f"""<h1>Project <span class="name">{_e(project.name)}</span></h1>{_noscript()}
<section aria-labelledby="h-lock"><h2 id="h-lock">Lock</h2>{_lock_section(project, now=now)}
<p><output id="action-result" role="status"></output></p></section>
<section aria-labelledby="h-state"><h2 id="h-state">State</h2>{summary}{problems}</section>
<section aria-labelledby="h-versions"><h2 id="h-versions">Versions</h2>{versions_table}</section>
<section aria-labelledby="h-vms"><h2 id="h-vms">VMs</h2>{vm_table}</section>
<section aria-labelledby="h-events"><h2 id="h-events">Project events</h2>{events_table}</section>
"""
    return layout(f"Project {project.name}", body, page="project", data={"project": project.name})
