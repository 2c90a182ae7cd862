"""Every metric the Grafana dashboard queries is one a real `tofu-qemu serve` exports (issue 20).

The names come from the live /metrics, families without samples included (no VM has restarted
yet, no LOCK conflicted), never from a list kept in the test; tests/unit/test_grafana_dashboard.py
shows the extractor reports a misspelt metric.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.e2e.harness import ServerProcess
from tests.promql_names import DASHBOARD_PATH, dashboard_expressions, exported_metric_names, metric_names


def test_dashboard_queries_only_metrics_the_server_exports(tmp_path: Path) -> None:
    server = ServerProcess(data_dir=tmp_path / "data", log_path=tmp_path / "server.log")
    server.start()
    try:
        answer = server.request("GET", "/metrics")
    finally:
        server.kill()
    assert answer.status == 200, answer.body[:500]
    exported = exported_metric_names(answer.body.decode())
    # The controller's and the store's families are there: a scrape of the right process.
    assert {"controller_runtime_reconcile_total", "tofu_qemu_host_ports_in_use"} <= exported

    expressions = list(dashboard_expressions(json.loads(DASHBOARD_PATH.read_text())))
    assert len(expressions) > 20
    unknown = {
        where: sorted(metric_names(expr) - exported)
        for where, expr in expressions
        if metric_names(expr) - exported
    }
    assert not unknown, f"the dashboard queries metrics tofu-qemu does not export: {unknown}"
