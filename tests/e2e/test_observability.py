"""A trace from `terraform apply` to a running guest, logs that carry it, and metrics that agree.

Real Terraform, real QEMU (TCG), real OTLP over HTTP to a loopback receiver that decodes the
protobuf (tests/otlp_receiver.py); Jaeger and Tempo ingest the same export.
"""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import MakeVmHost
from tests.e2e.harness import Fleet, GuestVM
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan, by_id, children_of, find

pytestmark = pytest.mark.e2e

SPAN_WAIT_SECONDS = 30.0


def test_apply_post_links_to_the_reconcile_that_boots_the_vm(
    make_vm_host: MakeVmHost, terraform_bin: str, project: str
) -> None:
    with OtlpReceiver() as receiver:
        host = make_vm_host()
        server = host.start("serve", extra_args=("--otlp-endpoint", receiver.endpoint))
        fleet = Fleet(host, terraform_bin, project=project)
        fleet.init()
        fleet.apply({"web": GuestVM(memory=128)})
        vm = fleet.wait_running("web")
        uid = vm["metadata"]["uid"]

        def booted(spans: list[ReceivedSpan]) -> tuple[ReceivedSpan, ReceivedSpan] | None:
            posts = [s for s in spans if s.name == "POST /state/{project}"]
            for reconcile in find(spans, "reconcile QemuVM"):
                if reconcile.attributes.get("tofu_qemu.uid") != uid:
                    continue
                if not any(c.name == "spawn" for c in children_of(spans, reconcile)):
                    continue
                # The link names the span current when the specs were written: the POST's own,
                # or its "extract QemuVM specs" child.
                for link in reconcile.links:
                    for post in posts:
                        linked = by_id(spans).get(link.span_id)
                        if link.span_id == post.span_id or (
                            linked is not None and linked.parent_span_id == post.span_id
                        ):
                            return post, reconcile
            return None

        post, reconcile = receiver.wait_for(
            booted, timeout=SPAN_WAIT_SECONDS, what="POST linked to a reconcile"
        )
        spans = receiver.spans()

        assert post.attributes.get("tofu_qemu.project") == project
        assert post.attributes.get("tofu_qemu.operation") == "POST"
        assert reconcile.parent_span_id is None
        assert reconcile.resource.get("service.name") == "tofu-qemu"
        assert reconcile.attributes["tofu_qemu.vm"] == "web"
        assert reconcile.attributes["tofu_qemu.generation"] == 1
        kids = children_of(spans, reconcile)
        [spawn] = [c for c in kids if c.name == "spawn"]
        assert spawn.trace_id == reconcile.trace_id
        assert spawn.parent_span_id == reconcile.span_id
        assert len(str(spawn.attributes["tofu_qemu.argv_digest"])) == 64
        # The spawn continues the guest once QMP answers (a child of its span); a `cont` it could
        # not send is sent by a later pass of the same VM. Never by a span outside a reconcile.
        reconciles = {
            s.span_id: s
            for s in find(spans, "reconcile QemuVM")
            if s.attributes.get("tofu_qemu.uid") == uid and s.start_ns >= reconcile.start_ns
        }
        assert any(c.name == "qmp cont" and c.parent_span_id in {spawn.span_id, *reconciles} for c in spans)
        boots = [s for s in spans if s.name == "boot QemuVM" and s.attributes.get("tofu_qemu.uid") == uid]
        assert boots
        assert boots[0].parent_span_id == spawn.span_id  # the boot starts inside the spawn
        assert "ready" in [event.name for event in boots[0].events]

        # The log lines written inside that reconcile carry its trace id.
        lines = [json.loads(line) for line in server.log_text().splitlines() if line.startswith("{")]
        spawned = [line for line in lines if line.get("event") == "vm_spawned" and line.get("uid") == uid]
        assert spawned
        assert spawned[0]["trace_id"] == reconcile.trace_id
        assert spawned[0]["span_id"] == spawn.span_id
        assert (spawned[0]["project"], spawned[0]["vm"]) == (project, "web")

        # Metrics agree with the API.
        answer = host.request("GET", "/metrics")
        assert answer.status == 200
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(answer.body.decode())
            for sample in family.samples
        }
        assert samples[("tofu_qemu_vms", (("phase", "Running"), ("project", project)))] == 1
        # A Running VM's reconcile settles: nothing timed, the liveness pass wakes it if it hangs.
        settled = (
            "controller_runtime_reconcile_total",
            (("controller", "qemuvm"), ("result", "success")),
        )
        assert samples[settled] >= 1
        assert samples[("tofu_qemu_vm_start_seconds_count", ())] >= 1


def test_a_collector_that_is_down_does_not_stop_a_vm_from_booting(
    make_vm_host: MakeVmHost, terraform_bin: str, project: str
) -> None:
    receiver = OtlpReceiver()
    endpoint = receiver.endpoint
    receiver.close()  # nothing listens there any more
    host = make_vm_host()
    host.start("serve", extra_args=("--otlp-endpoint", endpoint))
    fleet = Fleet(host, terraform_bin, project=project)
    fleet.init()
    fleet.apply({"web": GuestVM(memory=128)})
    assert fleet.wait_running("web")["status"]["phase"] == "Running"
    assert host.stop() == 0, "shutdown does not hang on the unreachable collector"


def test_lock_and_unlock_spans_follow_the_stable_http_conventions(
    make_vm_host: MakeVmHost, terraform_bin: str, project: str
) -> None:
    """Terraform's LOCK and UNLOCK are named by their method and route, and every server span
    carries the stable HTTP attributes, not the old ones."""
    with OtlpReceiver() as receiver:
        host = make_vm_host()
        host.start("serve", extra_args=("--otlp-endpoint", receiver.endpoint))
        fleet = Fleet(host, terraform_bin, project=project)
        fleet.init()
        fleet.apply({})
        route = "/state/{project}/lock"

        def lock_calls(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan] | None:
            on_route = [s for s in spans if s.name.endswith(route)]
            named = {str(s.attributes.get("http.request.method_original")): s for s in on_route}
            return named if {"LOCK", "UNLOCK"} <= named.keys() else None

        calls = receiver.wait_for(lock_calls, timeout=SPAN_WAIT_SECONDS, what="LOCK and UNLOCK spans")
        for method in ("LOCK", "UNLOCK"):
            span = calls[method]
            assert span.name == f"{method} {route}"
            assert span.kind == 2  # server
            assert span.attributes["http.request.method"] == "_OTHER"
            assert span.attributes["http.route"] == route
            assert span.attributes["url.path"] == f"/state/{project}/lock"
            assert span.attributes["http.response.status_code"] == 200
            assert span.attributes["tofu_qemu.operation"] == method
        servers = [s for s in receiver.spans() if s.kind == 2]
        gets = [s for s in servers if s.name == "GET /state/{project}"]
        assert gets
        assert gets[0].attributes["http.request.method"] == "GET"
        assert "http.request.method_original" not in gets[0].attributes
        for span in servers:
            assert not {"http.method", "http.target", "http.status_code"} & span.attributes.keys(), span
