"""The real kubectl (docs/kubectl.md) against `tofu-qemu api` over TLS with a bearer token, through
the kubeconfig `tofu-qemu kubeconfig` prints, on VMs that the real Terraform declared.

API only: kubectl reads objects, events and schemas; no VM has to boot for that.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import ServerProcess, Terraform, terraform_env, write_config
from tests.e2e.kube_support import Kubectl, tls_server, write_kubeconfig
from tests.e2e.tls_support import CLIENT_CN, Pki, pki

__all__ = ["pki"]  # fixtures
pytestmark = pytest.mark.e2e

PROJECT = "kube"
WATCH_TIMEOUT = 60.0
EDITOR = r"sed -i -e s/cpus:.1/cpus:\ 2/"
REFUSED = "QemuVM specs come from Terraform state; change them with tofu apply"
HCL = """
variable "vms" {
  type = set(string)
}

resource "terraform_data" "vm" {
  for_each = var.vms
  input = {
    apiVersion = "tofu-qemu.dev/v1alpha1"
    kind       = "QemuVM"
    metadata   = { name = each.key, labels = { tier = each.key == "db" ? "db" : "web" } }
    spec = {
      memory  = 128
      boot    = { kernel = "tiny-guest/vmlinuz" }
      network = { forwards = [{ guestPort = 80 }] }
    }
  }
}
"""


@pytest.fixture
def server(pki: Pki, tmp_path: Path) -> Iterator[ServerProcess]:
    process = tls_server(pki, tmp_path)
    try:
        process.start()
        yield process
    finally:
        process.kill()


def terraform(server: ServerProcess, pki: Pki, tmp_path: Path, terraform_bin: str) -> Terraform:
    env = terraform_env(state_url=server.state_url(PROJECT), scratch=tmp_path / "tf-scratch")
    env["TF_HTTP_CLIENT_CA_CERTIFICATE_PEM"] = pki.ca_cert.read_text()
    return Terraform(terraform_bin, write_config(tmp_path / "tf", HCL), env=env)


def apply(tf: Terraform, *names: str) -> None:
    vms = ",".join(f'"{name}"' for name in names)
    tf.run("apply", "-auto-approve", f"-var=vms=[{vms}]")


def test_kubectl_reads_qemuvms_events_namespaces_and_schemas(
    server: ServerProcess, pki: Pki, tmp_path: Path, terraform_bin: str
) -> None:
    """Discovery, get (-n, -A -l, -o jsonpath/wide/yaml, --field-selector), describe with events,
    get namespaces and events, explain, a watch that sees what terraform apply adds, and a 405
    on every write."""
    tf = terraform(server, pki, tmp_path, terraform_bin)
    tf.run("init", "-input=false")
    apply(tf, "web", "db")
    server.declare_vms("other", 1, {"edge": {"labels": {"tier": "web"}}})
    kubectl = Kubectl(write_kubeconfig(server, pki, tmp_path / "kubeconfig"), tmp_path / "home")

    resources = kubectl.out("api-resources", "--api-group=tofu-qemu.dev", "-o", "wide")
    assert re.search(r"qemuvms\s+qvm\s+tofu-qemu.dev/v1alpha1\s+true\s+QemuVM\s+get,list,watch", resources)
    # instancetypes: the kinds beside qemuvms, and the shipped common set (docs/instancetypes.md).
    assert re.search(
        r"qemuinstancetypes\s+qit\s+tofu-qemu.dev/v1alpha1\s+true\s+QemuInstanceType\s+get,list", resources
    )
    # snapshots: beside qemuvms too (docs/snapshots.md#the-api).
    assert re.search(
        r"qemuvmsnapshots\s+vmsnap\s+tofu-qemu.dev/v1alpha1\s+true\s+QemuVMSnapshot\s+get,list", resources
    )
    sizes = kubectl.out("get", "qcit")
    assert sizes.splitlines()[0].split() == ["NAME", "CPUS", "MEMORY", "REVISION"]
    assert [line.split()[:3] for line in sizes.splitlines()[1:]] == [
        ["u1.large", "2", "2048Mi"],
        ["u1.medium", "1", "1024Mi"],
        ["u1.small", "1", "512Mi"],
    ]

    table = kubectl.out("get", "qemuvms", "-n", PROJECT)
    assert table.splitlines()[0].split() == ["NAME", "PHASE", "READY", "ACCEL", "PORTS", "RESTARTS", "AGE"]
    assert sorted(line.split()[0] for line in table.splitlines()[1:]) == ["db", "web"]
    everywhere = kubectl.out("get", "qvm", "-A", "-l", "tier=web")
    assert sorted(tuple(line.split()[:2]) for line in everywhere.splitlines()[1:]) == [
        ("kube", "web"),
        ("other", "edge"),
    ]
    assert kubectl.out("get", "qvm", "-n", PROJECT, "-o", "jsonpath={.items[*].metadata.name}") == "db web"
    wide = kubectl.out("get", "qvm", "web", "-n", PROJECT, "-o", "wide")
    assert wide.split()[7:12] == ["PID", "CPUS", "MEMORY", "GENERATION", "REASON"]
    assert "128Mi" in wide
    assert kubectl.out("get", "qvm", "-A", "--field-selector", "metadata.name=db", "-o", "name") == (
        "qemuvm.tofu-qemu.dev/db\n"
    )
    assert "guestPort: 80" in kubectl.out("get", "qemuvm", "web", "-n", PROJECT, "-o", "yaml")

    described = kubectl.out("describe", "qemuvm", "web", "-n", PROJECT)
    assert re.search(r"Namespace:\s+kube", described)
    assert re.search(r"Type:\s+Valid", described)
    events = described[described.index("Events:") :]
    assert re.search(r"Normal\s+Created\s+\S+\s+tofu-qemu\s+generation 1 from terraform_data", events)
    assert "edge" not in events
    assert "qemuvm/db" in kubectl.out("get", "events", "-n", PROJECT)
    namespaces = kubectl.out("get", "namespaces")
    assert [line.split()[:2] for line in namespaces.splitlines()[1:]] == [
        ["kube", "Active"],
        ["other", "Active"],
    ]

    explained = kubectl.out("explain", "qemuvms.spec.network.forwards")
    assert "KIND:       QemuVM" in explained
    assert re.search(r"guestPort\s+<integer> -required-", explained)
    assert "spec" in kubectl.out("explain", "qemuvms")

    watch = kubectl.stream("get", "qvm", "-n", PROJECT, "-w")
    try:
        watch.wait_for("web", timeout=WATCH_TIMEOUT)
        apply(tf, "web", "db", "cache")
        assert watch.wait_for("cache", timeout=WATCH_TIMEOUT).split()[:2] == ["cache", "Pending"]
    finally:
        watch.close()

    refused = kubectl.run("delete", "qemuvm", "web", "-n", PROJECT, check=False)
    assert refused.returncode == 1
    assert refused.stderr.strip() == f"Error from server (MethodNotAllowed): {REFUSED}"
    manifest = tmp_path / "vm.yaml"
    manifest.write_text(
        "apiVersion: tofu-qemu.dev/v1alpha1\nkind: QemuVM\nmetadata: {name: x}\nspec: {cpus: 1}\n"
    )
    for verb in ("create", "apply"):
        answer = kubectl.run(verb, "-n", PROJECT, "-f", str(manifest), check=False)
        assert "(MethodNotAllowed)" in answer.stderr, verb
        assert REFUSED in answer.stderr, verb
    patched = kubectl.run(
        "patch", "qvm", "web", "-n", PROJECT, "--type=merge", "-p", '{"spec":{"cpus":2}}', check=False
    )
    assert "(MethodNotAllowed)" in patched.stderr
    # kubectl edit runs the editor (here sed, changing cpus), then PATCHes.
    edited = kubectl.run("edit", "qvm", "web", "-n", PROJECT, check=False, env={"KUBE_EDITOR": EDITOR})
    assert f"could not be patched: {REFUSED}" in edited.stderr
    assert server.vm(PROJECT, "web")["spec"]["cpus"] == 1


def test_kubectl_logs_in_with_a_client_certificate(pki: Pki, tmp_path: Path) -> None:
    """With tls_client_cert_users, a kubeconfig holding only a client certificate works, and the
    certificate's CN is the user an imperative action records."""
    server = tls_server(pki, tmp_path, "--tls-client-ca", str(pki.ca_cert), "--tls-client-cert-users")
    try:
        server.start()
        server.declare_vms(PROJECT, 1, {"web": {}})
        config = write_kubeconfig(
            server, pki, tmp_path / "kubeconfig", "--client-certificate", str(pki.client_cert),
            "--client-key", str(pki.client_key), token=None,
        )  # fmt: skip
        assert "token" not in config.read_text()
        kubectl = Kubectl(config, tmp_path / "home")
        assert kubectl.out("get", "qvm", "-n", PROJECT, "-o", "name") == "qemuvm.tofu-qemu.dev/web\n"
        stopped = server.request(
            "POST", f"/apis/tofu-qemu.dev/v1alpha1/namespaces/{PROJECT}/qemuvms/web", auth=None
        )
        assert stopped.status == 405
        action = server.request(
            "POST", f"/apis/tofu-qemu.dev/v1alpha1/projects/{PROJECT}/qemuvms/web/stop", auth=None
        )
        assert action.status == 200, action.body
        assert action.json()["status"]["override"]["requestedBy"] == CLIENT_CN.removeprefix("/CN=")
    finally:
        server.kill()
