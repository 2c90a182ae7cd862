"""hack/observability/grafana-dashboard.json and its compose provisioning, without a server.

The PromQL extractor is checked here on expressions whose answer is known, a wrong one included:
tests/e2e/test_grafana_dashboard.py relies on it to refuse a panel that names a metric the
server does not export.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from tests.promql_names import (
    DASHBOARD_PATH,
    dashboard_expressions,
    exported_metric_names,
    metric_names,
    variable_expression,
)

OBSERVABILITY = DASHBOARD_PATH.parent
# Grafana 11.0's dashboard schema; newer Grafanas migrate it on load.
MIN_SCHEMA_VERSION = 39
DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}
# What issue 20 asks the dashboard to show, one metric for each; the e2e test checks they exist.
ASKED_FOR = {
    "controller_runtime_reconcile_total",
    "controller_runtime_reconcile_errors_total",
    "workqueue_depth",
    "workqueue_queue_duration_seconds_bucket",
    "tofu_qemu_vms",
    "tofu_qemu_vm_restarts_total",
    "tofu_qemu_vm_exit_detect_seconds_bucket",
    "tofu_qemu_state_writes_total",
    "tofu_qemu_lock_conflicts_total",
    "tofu_qemu_vcpus_running",
    "tofu_qemu_memory_running_bytes",
    "tofu_qemu_auth_failures_total",
    "tofu_qemu_http_connections",
    "tofu_qemu_http_connections_closed_total",
    "tofu_qemu_controller_source_errors_total",
    "tofu_qemu_vm_cpu_seconds_total",
    "tofu_qemu_vm_memory_mib_seconds_total",
    "tofu_qemu_hosts",
    "tofu_qemu_host_capacity",
}


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        ('sum by (result) (rate(a_total{controller="qemuvm", job=~"$job"}[$__rate_interval]))', {"a_total"}),
        ("sum(rate(a_total[5m])) by (le, instance)", {"a_total"}),
        ("histogram_quantile(0.99, sum without (pod) (rate(h_bucket[1h30m])))", {"h_bucket"}),
        ("a / on (job) group_left (version) b offset 5m", {"a", "b"}),
        ("a > bool 1e-3 and b unless c or d", {"a", "b", "c", "d"}),
        ('{__name__="by_name", by="x"} + max_over_time(m[10m:1m])', {"by_name", "m"}),
        ('label_replace(x, "dst", "$1", "src", "(.*)")', {"x"}),
        ("topk(5, rate(cpu_seconds_total[${__range}]))", {"cpu_seconds_total"}),
        ("count(sum by (phase) (vms)) * 2 + inf", {"vms"}),
        ("sum:recorded:rate5m", {"sum:recorded:rate5m"}),
    ],
)
def test_metric_names_finds_every_selected_metric_and_nothing_else(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_a_metric_that_is_not_exported_is_reported() -> None:
    """The check the e2e test makes, on a panel with one real metric and one misspelt."""
    lines = ["# HELP workqueue_depth Current depth", "# TYPE workqueue_depth gauge", "workqueue_depth 0.0"]
    exported = exported_metric_names("\n".join(lines))
    assert metric_names("sum(workqueue_depth) + sum(workqueue_deepth)") - exported == {"workqueue_deepth"}


@pytest.mark.parametrize("expr", ["sum(rate(x[5m])", 'x{a="b"', "sum by (a (x)"])
def test_unbalanced_expressions_are_refused(expr: str) -> None:
    with pytest.raises(ValueError, match="unbalanced"):
        metric_names(expr)


def test_exported_names_include_families_without_samples() -> None:
    exposition = "\n".join(
        [
            "# HELP restarts_total VM restarts",
            "# TYPE restarts_total counter",
            "# HELP latency_seconds Latency",
            "# TYPE latency_seconds histogram",
            'latency_seconds_bucket{le="+Inf"} 0.0',
            "# HELP ports Ports",
            "# TYPE ports gauge",
            "ports 3.0",
        ]
    )
    assert exported_metric_names(exposition) == {
        "restarts_total",
        "restarts_created",
        "latency_seconds_bucket",
        "latency_seconds_sum",
        "latency_seconds_count",
        "latency_seconds_created",
        "ports",
    }


def test_variable_expression_reads_label_values_and_query_result() -> None:
    assert variable_expression('label_values(ports{job=~".+"}, job)') == 'ports{job=~".+"}'
    assert variable_expression("query_result(topk(3, vms))") == "topk(3, vms)"
    assert variable_expression("label_values(job)") is None


def _dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD_PATH.read_text())
    return loaded


def _all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels = list(dashboard["panels"])
    return panels + [inner for panel in panels for inner in panel.get("panels", [])]


def test_dashboard_imports_anywhere() -> None:
    """A current schema, no fixed datasource: every query goes through the `datasource` variable."""
    dashboard = _dashboard()
    assert dashboard["schemaVersion"] >= MIN_SCHEMA_VERSION
    assert dashboard["uid"] == "tofu-qemu"
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = [panel for panel in _all_panels(dashboard) if panel["type"] != "row"]
    for panel in panels:
        assert panel["datasource"] == DATASOURCE_REF, panel["title"]
        assert panel["targets"], panel["title"]
        assert all(target["datasource"] == DATASOURCE_REF for target in panel["targets"]), panel["title"]
    ids = [panel["id"] for panel in _all_panels(dashboard)]
    assert len(ids) == len(set(ids))


def test_every_expression_names_a_metric_and_the_issue_is_covered() -> None:
    expressions = list(dashboard_expressions(_dashboard()))
    named: set[str] = set()
    for where, expr in expressions:
        found = metric_names(expr)
        assert found, f"{where}: {expr!r} selects no metric"
        named |= found
    assert named >= ASKED_FOR, f"not on the dashboard: {sorted(ASKED_FOR - named)}"


def test_compose_provisions_grafana_with_prometheus_and_the_dashboard() -> None:
    """Only syntax and wiring: no container registry here to pull the images from."""
    compose = yaml.safe_load((OBSERVABILITY / "compose.yaml").read_text())
    grafana = compose["services"]["grafana"]
    assert grafana["network_mode"] == "host"
    # On the host network: loopback only, as Prometheus's targets are.
    assert grafana["environment"]["GF_SERVER_HTTP_ADDR"] == "127.0.0.1"
    mounts = dict(volume.removesuffix(":ro").split(":", 1) for volume in grafana["volumes"])
    for source in mounts:
        assert (OBSERVABILITY / source).exists(), source
    assert mounts["./grafana-dashboard.json"].endswith(".json")
    provider = _provisioning(OBSERVABILITY / "grafana" / "dashboards")["providers"][0]
    dashboard_dir = PurePosixPath(mounts["./grafana-dashboard.json"]).parent
    assert PurePosixPath(provider["options"]["path"]) == dashboard_dir
    assert mounts["./grafana/dashboards"] == "/etc/grafana/provisioning/dashboards"
    assert mounts["./grafana/datasources"] == "/etc/grafana/provisioning/datasources"
    datasource = _provisioning(OBSERVABILITY / "grafana" / "datasources")["datasources"][0]
    assert datasource["type"] == "prometheus"
    assert datasource["isDefault"] is True
    assert datasource["url"] == "http://127.0.0.1:9090"
    assert "prometheus" in compose["services"]


def _provisioning(directory: Path) -> dict[str, Any]:
    (only,) = directory.glob("*.yaml")
    loaded: dict[str, Any] = yaml.safe_load(only.read_text())
    assert loaded["apiVersion"] == 1
    return loaded
