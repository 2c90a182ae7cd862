"""`tofu-qemu describe vm`: one VM as kubectl describe shows a pod. Pure: no I/O, no clock."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from pydantic.alias_generators import to_camel

from api.client.format import NONE, age, ports, table
from api.humanize import human_duration
from api.types import PREFERENCE_FIELDS, TYPE_FIELDS, QemuVMSpec

LABEL_WIDTH = 14


def describe_vm(vm: Mapping[str, Any], events: Sequence[Mapping[str, Any]], now: datetime) -> str:
    metadata, spec, status = vm["metadata"], vm.get("spec", {}), vm.get("status", {})
    lines = [
        _field("Name", metadata["name"]),
        _field("Project", metadata["project"]),
        _field("UID", metadata["uid"]),
        _field("Labels", _pairs(metadata.get("labels", {}))),
        _field("Annotations", _pairs(metadata.get("annotations", {}))),
        _field("Created", _when(metadata.get("creationTimestamp"), now)),
    ]
    if metadata.get("deletionTimestamp"):
        lines.append(_field("Deleting", _when(metadata["deletionTimestamp"], now)))
    lines.append(
        _field("Generation", f"{metadata['generation']} (observed {status.get('observedGeneration', 0)})")
    )
    lines += ["Spec:", *_indent(_spec_lines(_with_types(spec, status)))]
    lines += ["Status:", *_indent(_status_lines(status, now))]
    lines += _guest_lines(status.get("guest"))
    lines.append("Conditions:")
    conditions = [
        [c["type"], c["status"], c["reason"], age(c.get("lastTransitionTime"), now), c.get("message") or ""]
        for c in status.get("conditions", ())
    ]
    lines += _indent(table(("TYPE", "STATUS", "REASON", "AGE", "MESSAGE"), conditions).splitlines())
    lines.append("Events:" if events else f"Events:{' ' * (LABEL_WIDTH - 7)}{NONE}")
    if events:
        lines += _indent(events_table(events, now).splitlines())
    return "\n".join(lines) + "\n"


def events_table(events: Sequence[Mapping[str, Any]], now: datetime) -> str:
    rows = [[age(e["time"], now), e["type"], e["reason"], e["message"], _trace(e)] for e in events]
    return table(("AGE", "TYPE", "REASON", "MESSAGE", "TRACE"), rows)


def _trace(event: Mapping[str, Any]) -> str:
    """The link the server made from its trace_url_template, else the bare trace id."""
    return str(event.get("traceUrl") or event.get("traceId") or NONE)


# What a VM with a type or preference leaves out of its stored spec (api/types.py canonical_spec).
_TYPED_DEFAULTS = {
    to_camel(name): str(QemuVMSpec.model_fields[name].default)
    for name in (*TYPE_FIELDS, *PREFERENCE_FIELDS)
    if QemuVMSpec.model_fields[name].default is not None
}


def _with_types(spec: Mapping[str, Any], status: Mapping[str, Any]) -> dict[str, Any]:
    """The spec with what the VM takes from its preference and instance type filled in
    (docs/instancetypes.md): what `describe` shows is what runs."""
    preference = (status.get("preference") or {}).get("spec", {})
    instance_type = (status.get("instanceType") or {}).get("spec", {})
    if "instanceType" not in spec and "preference" not in spec:
        return dict(spec)
    return {**_TYPED_DEFAULTS, **preference, **spec, **instance_type}


def _type_lines(spec: Mapping[str, Any]) -> list[str]:
    return [
        _field(label, f"{ref['name']} ({ref.get('kind', default)})")
        for label, key, default in (
            ("InstanceType", "instanceType", "QemuInstanceType"),
            ("Preference", "preference", "QemuPreference"),
        )
        if isinstance(ref := spec.get(key), dict) and "name" in ref
    ]


def _spec_lines(spec: Mapping[str, Any]) -> list[str]:
    lines = [
        *_type_lines(spec),
        _field("CPUs", str(spec.get("cpus", NONE))),
        _field(
            "Memory",
            f"{spec['memory']} MiB" if isinstance(spec.get("memory"), int) else str(spec.get("memory")),
        ),
        _field("Machine", str(spec.get("machine", NONE))),
        _field("Accel", str(spec.get("accel", NONE))),
        _field("Run Strategy", str(spec.get("runStrategy", NONE))),
    ]
    boot = spec.get("boot")
    if boot:
        parts = [f"kernel={boot['kernel']}"] + [
            f"{k}={boot[k]}" for k in ("initrd", "cmdline") if boot.get(k)
        ]
        lines.append(_field("Boot", " ".join(parts)))
    for disk in spec.get("disks", ()):
        source = disk.get("image") or "blank"
        size = f", {disk['size']} MiB" if disk.get("size") else ""
        lines.append(_field("Disk", f"{disk['name']}: {source}{size}, {disk.get('reclaimPolicy', 'Delete')}"))
    for forward in spec.get("network", {}).get("forwards", ()):
        host = forward.get("hostPort") or "auto"
        lines.append(
            _field("Forward", f"{forward.get('protocol', 'tcp')}/{forward['guestPort']} from host {host}")
        )
    if spec.get("cloudInit"):
        lines.append(_field("Cloud-init", "yes"))
    return lines


def _status_lines(status: Mapping[str, Any], now: datetime) -> list[str]:
    lines = [
        _field("Phase", status.get("phase") or NONE),
        _field("PID", str(status["pid"]) if status.get("pid") else NONE),
        _field("Accel", status.get("accel") or NONE),
        _field("Ports", ports({"status": status})),
        _field("Restarts", str(status.get("restarts", 0))),
        _field("Started", _when(status.get("startedAt"), now)),
    ]
    last_exit = status.get("lastExit")
    if last_exit:
        detail = ", ".join(
            f"{key} {last_exit[key]}" for key in ("exitCode", "signal") if last_exit.get(key) is not None
        )
        text = f"{last_exit['reason']}{f' ({detail})' if detail else ''}, {_when(last_exit['at'], now)}"
        lines.append(_field("Last Exit", text))
        if last_exit.get("message"):
            lines.append(_field("", last_exit["message"].strip().splitlines()[-1]))
    if status.get("nextRetryAt"):
        lines.append(_field("Next Retry", _when(status["nextRetryAt"], now)))
    override = status.get("override")
    if override:
        what = "stopped" if override.get("stopped") else "running"
        if override.get("restartRequestedAt"):
            what += f", restart requested {_when(override['restartRequestedAt'], now)}"
        if override.get("pauseRequestedAt"):
            what += f", pause requested {_when(override['pauseRequestedAt'], now)}"
        lines.append(_field("Override", f"{what} (by {override.get('requestedBy') or 'unknown'})"))
    return lines


def _field(label: str, value: str) -> str:
    return f"{(label + ':') if label else '':<{LABEL_WIDTH}}{value}"


def _pairs(mapping: Mapping[str, str]) -> str:
    return ", ".join(f"{key}={value}" for key, value in sorted(mapping.items())) or NONE


def _when(timestamp: str | None, now: datetime) -> str:
    if not timestamp:
        return NONE
    delta = now - datetime.fromisoformat(timestamp)
    if delta.total_seconds() < 0:
        return f"{timestamp} (in {human_duration(-delta)})"
    return f"{timestamp} ({human_duration(delta)} ago)"


def _indent(lines: Sequence[str]) -> list[str]:
    return [f"  {line}" for line in lines]


def _guest_lines(guest: Mapping[str, Any] | None) -> list[str]:
    """What the guest agent reports (docs/guest-agent.md); nothing for a VM without one."""
    if not guest:
        return []
    os_info = guest.get("osInfo") or {}
    system = os_info.get("prettyName") or os_info.get("name") or NONE
    if os_info.get("kernelRelease"):
        system += f" (kernel {os_info['kernelRelease']})"
    lines = [
        _field("Agent", "connected" if guest.get("agentConnected") else "not connected"),
        _field("OS", system),
        _field("Hostname", guest.get("hostname") or NONE),
    ]
    rows = [
        [i["name"], i.get("mac") or NONE, ", ".join(i.get("addresses", ())) or NONE]
        for i in guest.get("interfaces", ())
    ]
    if rows:
        lines += ["Interfaces:", *_indent(table(("NAME", "MAC", "ADDRESSES"), rows).splitlines())]
    return ["Guest:", *_indent(lines)]
