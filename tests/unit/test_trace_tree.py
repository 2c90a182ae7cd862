"""hack/trace-tree reads the SDK console exporter's real output, log lines and all."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

SCRIPT = Path(__file__).resolve().parents[2] / "hack" / "trace-tree"
# Interleaved as a server's stdout would have them: a plain log line with a stray brace, a JSON
# log object that is not a span, and a truncated object.
JUNK = [
    "2026-11-21T12:00:00Z [info] vm_started pid=42 argv={qemu-system-x86_64 ...}\n",
    '{"event": "status_written", "phase": "Running", "context": {"trace_id": "0x1"}}\n',
    '{"name": "cut off", "context": {\n',
]


@dataclass(frozen=True, slots=True)
class Console:
    text: str
    first_trace: str
    first_root: str
    second_trace: str


def console_output() -> Console:
    """Two reconcile traces as ConsoleSpanExporter writes them, junk lines between."""
    out = io.StringIO()
    # A private provider: the global one is left to the code under test elsewhere.
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=out)))
    tracer = provider.get_tracer("tests")

    out.write(JUNK[0])
    with tracer.start_as_current_span("reconcile QemuVM", attributes={"vm": "web"}) as first:
        with tracer.start_as_current_span("observe"):
            pass
        out.write(JUNK[1])
    out.write(JUNK[2])
    with tracer.start_as_current_span(
        "reconcile QemuVM",
        links=[trace.Link(first.get_span_context())],
        attributes={"vm": "web", "argv": "x" * 100},
    ) as second:
        with tracer.start_as_current_span("spawn", attributes={"pid": 4242}) as spawn:
            spawn.add_event("process_started")
            with tracer.start_as_current_span("qmp connect"):
                pass
        with tracer.start_as_current_span("qmp cont") as cont:
            cont.set_status(trace.Status(trace.StatusCode.ERROR, "guest is gone"))
        out.write(JUNK[0])
    provider.shutdown()
    return Console(
        text=out.getvalue(),
        first_trace=trace.format_trace_id(first.get_span_context().trace_id),
        first_root=trace.format_span_id(first.get_span_context().span_id),
        second_trace=trace.format_trace_id(second.get_span_context().trace_id),
    )


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        input=stdin,
        capture_output=True,
        encoding="utf-8",
        timeout=30,
        check=False,
    )


def normalized(stdout: str) -> list[str]:
    """The output lines with durations and start times, which vary per run, replaced."""
    stdout = re.sub(r"\d+\.\d+ ms", "D ms", stdout)
    return re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", "TIME", stdout).splitlines()


@pytest.fixture(scope="module")
def console() -> Console:
    return console_output()


def test_prints_the_last_reconcile_tree_in_start_order(console: Console) -> None:
    """By default only the last "reconcile QemuVM" prints, children nested in the order they started."""
    result = run(stdin=console.text)
    assert result.returncode == 0, result.stderr
    assert normalized(result.stdout) == [
        f"trace {console.second_trace} TIME",
        "reconcile QemuVM  D ms  vm=web  argv=" + "x" * 59 + "…",
        f"│ ↪ link trace={console.first_trace[:8]} span={console.first_root[:8]}",
        "├ spawn  D ms  pid=4242",
        "│ │ • process_started",
        "│ └ qmp connect  D ms",
        "└ qmp cont  D ms  [ERROR: guest is gone]",
    ]


def test_reads_a_file_like_stdin(console: Console, tmp_path: Path) -> None:
    """A file argument gives the same output as the same text on stdin."""
    path = tmp_path / "spans.txt"
    path.write_text(console.text, encoding="utf-8")
    from_file = run(str(path))
    assert from_file.returncode == 0, from_file.stderr
    assert from_file.stdout == run(stdin=console.text).stdout


def test_last_and_all_print_several_trees_oldest_first(console: Console) -> None:
    """--last 2 and --all both give the two traces, oldest first, each under its own header."""
    for args in (["--last", "2"], ["--all"]):
        result = run(*args, stdin=console.text)
        assert result.returncode == 0, result.stderr
        lines = normalized(result.stdout)
        headers = [line for line in lines if line.startswith("trace ")]
        assert headers == [f"trace {console.first_trace} TIME", f"trace {console.second_trace} TIME"], args
        assert lines[1:4] == ["reconcile QemuVM  D ms  vm=web", "└ observe  D ms", ""], args


def test_root_selects_another_span_and_its_subtree(console: Console) -> None:
    """--root prints the subtree under a span that is not a trace root."""
    result = run("--root", "spawn", stdin=console.text)
    assert result.returncode == 0, result.stderr
    assert normalized(result.stdout) == [
        f"trace {console.second_trace} TIME",
        "spawn  D ms  pid=4242",
        "│ • process_started",
        "└ qmp connect  D ms",
    ]


def test_no_matching_span_exits_1(console: Console) -> None:
    """A name that never occurs is exit status 1 with a reason on stderr, and nothing on stdout."""
    result = run("--root", "no such span", stdin=console.text)
    assert (result.returncode, result.stdout) == (1, "")
    assert "no span named 'no such span' among 6 spans in <stdin>" in result.stderr


def test_input_without_spans_exits_1() -> None:
    """Logs alone, with no console exporter output in them, are exit status 1."""
    result = run("--all", stdin="".join(JUNK))
    assert result.returncode == 1
    assert "no spans in <stdin>" in result.stderr


@pytest.mark.parametrize(
    "args",
    [["--last", "0"], ["--last", "x"], ["--all", "--root", "spawn"], ["--bogus"], ["/nonexistent/spans.txt"]],
    ids=["last-zero", "last-not-a-number", "all-with-root", "unknown-option", "missing-file"],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    """Bad options and an unreadable file are usage errors: exit status 2 and a message."""
    result = run(*args)
    assert result.returncode == 2
    assert "trace-tree: error:" in result.stderr


def test_is_an_executable_script() -> None:
    """It is run as `hack/trace-tree`: executable, with a python3 shebang and no venv needed."""
    assert SCRIPT.read_text(encoding="utf-8").startswith("#!/usr/bin/env python3\n")
    assert os.access(SCRIPT, os.X_OK)
