"""The guest agent's channel on the QEMU command line (docs/guest-agent.md). Pure.

A virtio-serial controller with one port named org.qemu.guest_agent.0 (the name qemu-ga and
the tiny guest's /init look for), whose host end is a UNIX socket in the VM's runtime dir,
given relative to QEMU's working directory like the QMP socket.
"""

from __future__ import annotations

from api.types import Machine, QemuVMSpec

AGENT_SOCKET_NAME = "qga.sock"
AGENT_CHANNEL_NAME = "org.qemu.guest_agent.0"


def agent_channel_argv(spec: QemuVMSpec) -> list[str]:
    """The arguments for `spec.guestAgent`; none without it."""
    if not spec.guest_agent:
        return []
    controller = "virtio-serial-device" if spec.machine is Machine.MICROVM else "virtio-serial-pci"
    return [
        "-device",
        f"{controller},id=agent-serial",
        "-chardev",
        f"socket,id=agent,path={AGENT_SOCKET_NAME},server=on,wait=off",
        "-device",
        f"virtserialport,bus=agent-serial.0,chardev=agent,name={AGENT_CHANNEL_NAME}",
    ]
