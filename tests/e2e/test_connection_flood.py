"""A flood of connections that send half a request header cannot take the server down (issue 15
H1): with 1024 open files, 1,100 such connections leave /healthz answering, the controller
resyncing, and every half-sent connection closed after the header timeout."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.e2e.harness import ServerProcess
from tests.sockets import closed_within

SERVER_OPEN_FILES = 1024
FLOOD_CONNECTIONS = 1100
FLOOD_BATCH = 100
HEADER_TIMEOUT_SECONDS = 3.0
RESYNC_SECONDS = 1.0
PROBE_TIMEOUT_SECONDS = 5.0
# One request line and the start of a header, never finished.
HALF_A_REQUEST = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


@dataclass
class FloodFigures:
    opened: int = 0
    probe_seconds: list[float] = field(default_factory=list)
    probe_statuses: list[int] = field(default_factory=list)
    server_fds: list[int] = field(default_factory=list)
    seconds_until_all_closed: float = 0.0
    still_open: int = 0


def test_half_sent_headers_do_not_starve_the_server(tmp_path: Path) -> None:
    """1,100 half-sent requests against a server limited to 1024 files: every /healthz probe
    during and after the flood is answered 200, the server's open files stay within its limit,
    the process survives several resyncs, and the half-sent connections are all closed within
    the header timeout."""
    _raise_own_open_file_limit(FLOOD_CONNECTIONS * 2)
    server = ServerProcess(
        data_dir=tmp_path / "data",
        log_path=tmp_path / "server.log",
        extra_args=[
            "--resync-seconds",
            str(RESYNC_SECONDS),
            "--header-timeout-seconds",
            str(HEADER_TIMEOUT_SECONDS),
        ],
        open_files=(SERVER_OPEN_FILES, SERVER_OPEN_FILES),
    )
    try:
        server.start()
        assert server.pid is not None
        figures = asyncio.run(_flood(server.port, server.pid))
        print(f"flood figures: {_summary(figures)}")  # the numbers the security doc quotes
        assert figures.opened == FLOOD_CONNECTIONS
        assert set(figures.probe_statuses) == {200}, _summary(figures)
        assert max(figures.server_fds) < SERVER_OPEN_FILES * 3 // 4, _summary(figures)
        assert figures.still_open == 0, _summary(figures)
        assert server.is_running, server.log_text()
        assert server.request("GET", "/readyz").status == 200, server.log_text()
        log = server.log_since_last_start()
        assert "Too many open files" not in log
        assert _serving_line(log)["max_connections"] == SERVER_OPEN_FILES // 2
        metrics = server.request("GET", "/metrics").body.decode()
        assert 'tofu_qemu_http_connections_closed_total{listener="api",reason="evicted"}' in metrics
        assert 'tofu_qemu_http_connections_closed_total{listener="api",reason="header_timeout"}' in metrics
    finally:
        server.kill()


def test_the_soft_open_file_limit_is_raised_to_the_hard_one(tmp_path: Path) -> None:
    """Started with a soft limit of 1024 under a hard one of 4096, the server runs with 4096."""
    server = ServerProcess(
        data_dir=tmp_path / "data", log_path=tmp_path / "server.log", command="api", open_files=(1024, 4096)
    )
    try:
        server.start()
        assert server.pid is not None
        assert _open_file_limits(server.pid) == (4096, 4096)
    finally:
        server.kill()


async def _flood(port: int, pid: int) -> FloodFigures:
    figures = FloodFigures()
    connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for _ in range(FLOOD_CONNECTIONS // FLOOD_BATCH):
        batch = await asyncio.gather(*(_half_request(port) for _ in range(FLOOD_BATCH)))
        connections += batch
        await _probe(port, figures)
        figures.server_fds.append(len(os.listdir(f"/proc/{pid}/fd")))
    figures.opened = len(connections)
    flooded_at = time.monotonic()
    # Several resync periods with the flood in place: the controller keeps its files.
    while time.monotonic() - flooded_at < 3 * RESYNC_SECONDS:
        await _probe(port, figures)
        figures.server_fds.append(len(os.listdir(f"/proc/{pid}/fd")))
    closed = await asyncio.gather(
        *(closed_within(reader, HEADER_TIMEOUT_SECONDS + 2.0) for reader, _writer in connections)
    )
    figures.seconds_until_all_closed = time.monotonic() - flooded_at
    figures.still_open = closed.count(False)
    for _reader, writer in connections:
        writer.close()
    return figures


async def _half_request(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    async with asyncio.timeout(PROBE_TIMEOUT_SECONDS):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(HALF_A_REQUEST)
        await writer.drain()
    return reader, writer


async def _probe(port: int, figures: FloodFigures) -> None:
    """GET /healthz on a new connection; a timeout or a refused connection counts as status 0."""
    started = time.monotonic()
    status = 0
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_SECONDS):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            status = int((await reader.readline()).split()[1])
            writer.close()
    except (TimeoutError, OSError, IndexError, ValueError):
        status = 0
    figures.probe_seconds.append(time.monotonic() - started)
    figures.probe_statuses.append(status)


def _summary(figures: FloodFigures) -> str:
    probes = sorted(figures.probe_seconds)
    return (
        f"connections={figures.opened} probes={len(probes)} "
        f"non_200={sum(status != 200 for status in figures.probe_statuses)} "
        f"healthz_p50_ms={probes[len(probes) // 2] * 1000:.1f} healthz_max_ms={probes[-1] * 1000:.1f} "
        f"server_fds_max={max(figures.server_fds)} still_open={figures.still_open} "
        f"all_closed_after_s={figures.seconds_until_all_closed:.1f}"
    )


def _serving_line(log: str) -> dict[str, object]:
    for line in log.splitlines():
        if '"serving"' in line:
            parsed: dict[str, object] = json.loads(line)
            return parsed
    raise AssertionError(f"no serving line in:\n{log}")


def _open_file_limits(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-file limit in /proc/PID/limits")


def _raise_own_open_file_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))
