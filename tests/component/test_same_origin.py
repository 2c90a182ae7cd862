"""Cross-site writes from browsers are refused; Terraform, the CLI and same-origin pages are not."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from api.server.origin import cross_site_problem
from api.testing.tfstate import encode, vm_state
from tests.component.conftest import AUTH

Client = TestClient[Any, Any]


@pytest.mark.parametrize(
    ("origin", "fetch_site", "refused"),
    [
        pytest.param(None, None, False, id="terraform-curl-cli"),
        pytest.param("http://tofu.example:8080", None, False, id="same-origin"),
        pytest.param("HTTP://TOFU.EXAMPLE:8080", "same-origin", False, id="same-origin-any-case"),
        pytest.param(None, "none", False, id="typed-in-address-bar"),
        pytest.param("https://evil.example", None, True, id="other-site"),
        pytest.param("http://tofu.example:9999", None, True, id="other-port"),
        pytest.param("null", None, True, id="sandboxed-or-file"),
        pytest.param(None, "cross-site", True, id="fetch-metadata-only"),
        pytest.param("http://tofu.example:8080", "same-site", True, id="sibling-subdomain"),
    ],
)
def test_cross_site_problem(origin: str | None, fetch_site: str | None, refused: bool) -> None:
    assert (cross_site_problem("tofu.example:8080", origin, fetch_site) is not None) is refused


async def test_a_cross_site_state_write_is_refused_and_stores_nothing(client: Client) -> None:
    body = encode(vm_state(1, {}))
    refused = await client.post("/state/lab", data=body, headers={**AUTH, "Origin": "https://evil.example"})
    assert refused.status == 403
    assert "origin 'https://evil.example'" in (await refused.json())["message"]
    assert (await client.get("/state/lab", headers=AUTH)).status == 204
    same_origin = {**AUTH, "Origin": f"http://{client.server.host}:{client.server.port}"}
    assert (await client.post("/state/lab", data=body, headers=same_origin)).status == 200


async def test_reads_are_never_refused_for_their_origin(client: Client) -> None:
    response = await client.get("/api/v1/projects", headers={**AUTH, "Origin": "https://evil.example"})
    assert response.status == 200


async def test_a_cors_preflight_is_never_approved(client: Client) -> None:
    """What makes X-Requested-By unsendable from another site (docs/dashboard.md): the browser
    asks first, and no answer here carries an Access-Control-Allow-* header."""
    preflight = await client.options(
        "/apis/tofu-qemu.dev/v1alpha1/projects/lab/qemuvms/web/stop",
        headers={
            "Origin": "https://evil.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,x-requested-by",
        },
    )
    assert preflight.status >= 400
    assert not [name for name in preflight.headers if name.lower().startswith("access-control-")]
