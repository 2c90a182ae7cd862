"""Controller settings; `tofu-qemu serve` combines them with the server's (api/settings.py).

Same layering and naming as the server: flag `--port-range`, env `TOFU_QEMU_PORT_RANGE`,
config key `port_range`.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

from pydantic import Field, field_validator

from api.hosts import host_name_problem, parse_host_labels
from api.infra.settings import ProcessSettings, split_listen
from api.settings import ServerSettings
from controller.admission import Quota, Quotas, parse_project_quotas, parse_quota
from controller.images.egress import EgressPolicy, parse_networks
from controller.images.fetch import FetchLimits

# A thin overlay costs nothing until the guest writes, so sizes are claims, not usage: 1 TiB lets
# a project run dozens of ordinary VMs (8-64 GiB disks) and refuses a typo's or an attacker's
# 16 x 64 TiB outright. Operators raise it per project (project_quotas) or for all.
DEFAULT_PROJECT_MAX_DISK_GIB = 1024


class ControllerSettings(ProcessSettings):
    images_dir: Path | None = Field(default=None, description="Kernels and base images (default DATA/images)")
    port_range: str = Field(default="20000-29999", description="Host ports for forwards without hostPort")
    # Reconciles mostly wait on QEMU (spawn, QMP round trips that slow down while guests boot),
    # so workers are cheap and many keep a large apply from queueing behind a few slow starts.
    workers: int = Field(default=64, ge=1, le=1024, description="VMs reconciled at once")
    resync_seconds: float = Field(default=30.0, gt=0, description="Resync period (see full_resync_seconds)")
    backoff_base_seconds: float = Field(default=0.5, gt=0, description="First retry delay after an error")
    backoff_cap_seconds: float = Field(default=300.0, gt=0, description="Longest retry delay after errors")
    guest_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="CPU nice value of QEMU processes, so the API and controller stay responsive",
    )
    max_vms: int | None = Field(default=None, ge=1, description="VMs allowed to run on this server")
    max_memory_mib: int | None = Field(
        default=None, ge=1, description="Memory (MiB) all running VMs may claim"
    )
    max_vcpus: int | None = Field(default=None, ge=1, description="vCPUs all running VMs may claim")
    max_disk_gib: int | None = Field(default=None, ge=1, description="Disk sizes (GiB) all VMs may claim")
    project_quotas: str | None = Field(
        default=None, description="Per-project limits: PROJECT:max_vms=N,max_memory_mib=N;PROJECT:..."
    )
    liveness_seconds: float = Field(
        default=10.0,
        gt=0,
        description="How often every running QEMU is looked at in /proc, to find hung ones (QMP is asked "
        "only when the look is odd)",
    )
    memory_reserve_mib: int = Field(
        default=256, ge=0, description="Memory (MiB) a VM start must leave available on the host"
    )
    accel_cache: Path | None = Field(default=None, description="Where the KVM probe verdict is kept")
    forward_address: str = Field(
        default="127.0.0.1",
        description="IPv4 address VM port forwards listen on (0.0.0.0 in a container, to publish them)",
    )
    stop_vms_on_exit: bool = Field(
        default=False,
        description="On SIGTERM, power guests down (ACPI, then quit) before exiting instead of leaving "
        "them running for the next start to adopt",
    )
    shutdown_timeout_seconds: float = Field(
        default=60.0, gt=0, description="With stop_vms_on_exit: the longest wait for guests to stop"
    )
    image_cache_grace_seconds: float = Field(
        default=86400.0,
        ge=0,
        description="How long an image no VM or disk references stays in the download cache",
    )
    image_max_gib: float = Field(default=64.0, gt=0, description="The largest image a URL may download")
    ops_listen: str = Field(
        default="127.0.0.1:8081",
        description="HOST:PORT for /healthz, /readyz and /metrics of `tofu-qemu controller` (no auth)",
    )
    # Admission of host ports and disk space (docs/controller.md, "Quotas and the host reserves").
    max_ports: int | None = Field(default=None, ge=1, description="Host ports all VMs' forwards may hold")
    default_project_quotas: str = Field(
        default=f"max_disk_gib={DEFAULT_PROJECT_MAX_DISK_GIB}",
        description="Limits every project gets unless project_quotas sets its own: max_disk_gib=N,...",
    )
    storage_reserve_mib: int = Field(
        default=1024,
        ge=0,
        description="Free space (MiB) the disks dir's filesystem must keep after a VM's new disks are full",
    )

    @field_validator("default_project_quotas")
    @classmethod
    def _valid_default_project_quotas(cls, value: str) -> str:
        parse_quota(value, what="default_project_quotas")
        return value

    @field_validator("ops_listen")
    @classmethod
    def _valid_ops_listen(cls, value: str) -> str:
        split_listen(value)
        return value

    @field_validator("forward_address")
    @classmethod
    def _valid_forward_address(cls, value: str) -> str:
        try:
            ipaddress.IPv4Address(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an IPv4 address") from None
        return value

    @field_validator("project_quotas")
    @classmethod
    def _valid_project_quotas(cls, value: str | None) -> str | None:
        if value is not None:
            parse_project_quotas(value)
        return value

    @property
    def quotas(self) -> Quotas:
        return Quotas(
            server=Quota(
                self.max_vms, self.max_memory_mib, self.max_vcpus, self.max_disk_gib, self.max_ports
            ),
            projects=parse_project_quotas(self.project_quotas or ""),
            project_default=parse_quota(self.default_project_quotas),
        )

    @field_validator("port_range")
    @classmethod
    def _valid_range(cls, value: str) -> str:
        split_port_range(value)
        return value

    @property
    def resolved_images_dir(self) -> Path:
        return self.images_dir or self.data_dir / "images"

    @property
    def resolved_accel_cache(self) -> Path:
        return self.accel_cache or self.data_dir / "accel.json"

    @property
    def ports(self) -> tuple[int, int]:
        return split_port_range(self.port_range)

    # Image downloads: where they may connect, and how long and how many (docs/images.md).
    image_fetch_allow_networks: str | None = Field(
        default=None,
        description="Networks (CIDR, comma-separated) image downloads may reach besides public "
        "addresses, e.g. a local mirror's; loopback, private and link-local are refused otherwise",
    )
    image_download_deadline_seconds: float = Field(
        default=21600.0, gt=0, description="The longest one image download may take, resumes aside"
    )
    image_download_min_kib_per_second: float = Field(
        default=10.0, ge=0, description="Slower downloads (over each rate window) are cut; 0 disables"
    )
    image_download_rate_window_seconds: float = Field(
        default=60.0, gt=0, description="The window the minimum download rate is measured over"
    )
    image_max_concurrent_downloads: int = Field(
        default=4, ge=1, le=64, description="Image downloads running at once; the others wait"
    )

    # Incremental resync (controller/resync.py, docs/controller.md "Liveness and resync"): a
    # resync queues only the VMs whose inputs changed; every VM is queued once per this period.
    full_resync_seconds: float = Field(
        default=300.0,
        gt=0,
        description="How often a resync queues every VM, not only those whose inputs changed",
    )

    @field_validator("image_fetch_allow_networks")
    @classmethod
    def _valid_allow_networks(cls, value: str | None) -> str | None:
        parse_networks(value)
        return value

    @property
    def image_egress(self) -> EgressPolicy:
        return EgressPolicy(parse_networks(self.image_fetch_allow_networks))

    @property
    def image_fetch_limits(self) -> FetchLimits:
        return FetchLimits(
            max_bytes=int(self.image_max_gib * 2**30),
            deadline=self.image_download_deadline_seconds,
            min_bytes_per_second=int(self.image_download_min_kib_per_second * 1024),
            rate_window=self.image_download_rate_window_seconds,
            max_concurrent=self.image_max_concurrent_downloads,
        )

    # Usage metering: how often running VMs are sampled, how long the hourly sums are kept.
    usage_sample_seconds: float = Field(
        default=15.0,
        ge=1,
        le=3600,
        description="How often each running VM's CPU, memory and disk use is sampled (seconds)",
    )
    usage_retention_days: int = Field(
        default=400, ge=1, le=3650, description="How long the hourly usage of VMs is kept (days)"
    )

    # Several hosts on one store: host identity, labels and leases (docs/multi-host.md).
    host_name: str | None = Field(
        default=None,
        description="This controller's host, as VMs' status.host names it (default: the machine's "
        "hostname, lower-cased)",
    )
    host_labels: str = Field(
        default="", description="Labels of this host that spec.nodeSelector matches: k=v,..."
    )
    host_lease_seconds: float = Field(
        default=15.0, gt=0, description="A host whose lease is not renewed for this long is NotReady"
    )
    host_lost_grace_seconds: float = Field(
        default=30.0, ge=0, description="How long after its lease expired a host counts as lost"
    )

    @field_validator("host_name")
    @classmethod
    def _valid_host_name(cls, value: str | None) -> str | None:
        problem = None if value is None else host_name_problem(value)
        if problem:
            raise ValueError(f"host name {problem}")
        return value

    @field_validator("host_labels")
    @classmethod
    def _valid_host_labels(cls, value: str) -> str:
        parse_host_labels(value)
        return value

    @property
    def resolved_host_name(self) -> str:
        return self.host_name or default_host_name()

    @property
    def labels(self) -> dict[str, str]:
        return parse_host_labels(self.host_labels)

    # Guest networking (docs/networking.md): egress for guests in network mode passt.
    guest_egress: bool = Field(
        default=False,
        description="Whether guests may open connections out (network mode passt only; never to "
        "the host's loopback): the default of spec.network.egress there, and whether a spec may set it",
    )

    # The VM page's minute-resolution charts: how long the per-minute usage is kept (docs/usage.md).
    usage_minutes_retention_hours: int = Field(
        default=48,
        ge=24,
        le=744,
        description="How long the per-minute usage of VMs, which the VM page charts, is kept (hours)",
    )

    # The passt loopback guard (docs/networking.md): nftables rules keeping egress off the host's loopback.
    guest_loopback_guard: bool = Field(
        default=True,
        description="With guest_egress: install nftables rules refusing passt's new connections to the "
        "host's 127.0.0.0/8 and ::1 (needs root and nft); where they cannot be, mode passt is Valid=False. "
        "Off: a root guest can reach the host's loopback services",
    )


def default_host_name() -> str:
    """The machine's hostname, lower-cased, up to its first dot if the whole is not a valid name."""
    name = socket.gethostname().lower()
    return name if host_name_problem(name) is None else name.split(".")[0]


def split_port_range(text: str) -> tuple[int, int]:
    """Parse "FIRST-LAST". :raise ValueError: malformed or outside 1024-65535."""
    first, sep, last = text.partition("-")
    if not (sep and first.isdigit() and last.isdigit()) or not 1024 <= int(first) <= int(last) <= 65535:
        raise ValueError(f"port range {text!r} must be FIRST-LAST within 1024-65535")
    return int(first), int(last)


class ServeSettings(ServerSettings, ControllerSettings):
    """`tofu-qemu serve`: the API server and the controller in one process."""
