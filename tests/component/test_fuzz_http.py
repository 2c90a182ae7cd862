"""The HTTP API under hostile input: no request makes the server answer 5xx or lose its footing.

Hypothesis drives random methods, paths, query strings, headers and bodies at every route in
api/server/routes.py through the real app and store. Table tests pin the bodies and paths that
once crashed a handler, path traversal through project names, and a 10,000-VM state.
Example counts follow TOFU_QEMU_FUZZ_EXAMPLES (tests/unit/test_fuzz_models.py).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import time
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import event, given
from hypothesis import strategies as st

from api.server.routes import ROUTES
from api.testing.tfstate import encode, vm_state
from tests.component.conftest import AUTH
from tests.unit.test_fuzz_models import fuzz_settings, json_values, manifests, odd_state_bodies, states

Client = TestClient[Any, Any]
ROUTE_TEMPLATES = sorted({route.path for route in ROUTES})
ROUTE_METHODS = sorted({route.method for route in ROUTES})
# Per entry of ROUTES, unless TOFU_QEMU_FUZZ_EXAMPLES says otherwise. docs/security.md gives the
# number of routes; tests/unit/test_fuzz_route_count.py keeps it equal to len(ROUTES).
PER_ROUTE_EXAMPLES = 40
PLACEHOLDER = re.compile(r"\{(\w+)\}")
BEARER = {"Authorization": "Bearer tok-1"}


def md5_of(body: bytes) -> str:
    return base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()


async def assert_well_formed(method: str, response: Any) -> None:
    """No 5xx; an error is JSON, a Status object unless it is a holder's lock info (409/423)."""
    body = await response.read()
    event(f"{method if method in ROUTE_METHODS else 'other'} {response.status}")
    assert response.status < 500, f"{method} {response.url} -> {response.status}: {body[:300]!r}"
    if response.status >= 400 and method != "HEAD":
        document = json.loads(body)
        if response.status not in (409, 423):
            assert document["code"] == response.status


# ---- Strategies ---------------------------------------------------------------------------------

printable_ascii = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
# Hypothesis favours a one_of's first branches, so plausible values come first.
segments = st.one_of(
    st.sampled_from(["lab", "web", "1"]),
    st.sampled_from(["..", ".", "%2e%2e", "a%2Fb", "-rf", "0", "x" * 200, "%C2%B2", "%D9%A1"]),
    st.text(min_size=1, max_size=30).map(lambda text: quote(text, safe="")),
)
# Every method aiohttp's HTTP parser (llhttp) knows; it answers any other with its own plain-text
# 400 before the app sees the request, so those would test the parser, not this code. CONNECT
# is left out: it turns the connection into a tunnel by definition.
PARSER_METHODS = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "TRACE", "PATCH", "COPY", "LOCK",
    "UNLOCK", "MKCOL", "MOVE", "PROPFIND", "PROPPATCH", "SEARCH", "REPORT", "PURGE", "LINK", "UNLINK",
]  # fmt: skip
methods = st.sampled_from(sorted({*ROUTE_METHODS, *PARSER_METHODS}))


@st.composite
def route_paths(draw: st.DrawFn, template: str | None = None) -> str:
    """A route template with every placeholder filled: usually a plausible value, sometimes junk."""
    chosen = template if template is not None else draw(st.sampled_from(ROUTE_TEMPLATES))
    return PLACEHOLDER.sub(lambda _match: draw(segments), chosen)


any_paths = st.lists(segments, max_size=5).map(lambda parts: "/" + "/".join(parts))
queries = st.one_of(
    st.just(""),
    st.dictionaries(st.sampled_from(["ID", "id", "serial", "x"]), printable_ascii, max_size=2).map(urlencode),
)
authorizations = st.one_of(
    st.just(AUTH),
    st.just(BEARER),
    st.just({}),
    printable_ascii.map(lambda value: {"Authorization": value}),
    printable_ascii.map(lambda value: {"Authorization": "Basic " + value}),
    st.binary(max_size=30).map(lambda raw: {"Authorization": "Basic " + base64.b64encode(raw).decode()}),
)
lock_infos = st.fixed_dictionaries(
    {},
    optional={
        "ID": json_values | printable_ascii,
        "Operation": json_values,
        "Who": json_values,
        "Info": json_values,
        "Version": json_values,
        "Created": json_values,
        "Path": json_values,
    },
)


def state_declaring(items: list[dict[str, Any]]) -> bytes:
    """A well-formed state whose one resource holds `items` as bare manifests."""
    instances = [{"attributes": {"input": item}} for item in items]
    resource = {"mode": "managed", "type": "terraform_data", "name": "vm", "instances": instances}
    return encode({**vm_state(1, {}), "resources": [resource]})


# Lock bodies shaped like the ones that once crashed a handler: nesting near and past the JSON
# parser's limit, and IDs or names holding a lone UTF-16 surrogate escape.
odd_lock_bodies = st.one_of(
    st.sampled_from([2, 100, 960, 975, 990, 5000]).map(
        lambda n: b'{"ID":"x","Info":' + b"[" * n + b"]" * n + b"}"
    ),
    st.sampled_from(["ID", "Who", "Operation", "Info"]).map(
        lambda key: b'{"ID":"x","%s":"\\udc80"}' % key.encode()
    ),
)
# Most likely to get deep into a handler first (see `segments`).
bodies = st.one_of(
    st.lists(manifests, max_size=3).map(state_declaring),
    states.map(lambda document: json.dumps(document).encode()),
    lock_infos.map(lambda info: json.dumps(info).encode()),
    odd_lock_bodies,
    odd_state_bodies,
    json_values.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=200),
    st.just(b""),
)


@st.composite
def extra_headers(draw: st.DrawFn, body: bytes) -> dict[str, str]:
    """Content-MD5 right, wrong or absent; a random Content-Type; a few random headers."""
    headers = draw(
        st.dictionaries(st.from_regex(r"X-[A-Za-z0-9-]{1,10}", fullmatch=True), printable_ascii, max_size=2)
    )
    md5 = draw(st.sampled_from(["right", "right", "none", "wrong"]))
    if md5 == "right":
        headers["Content-MD5"] = md5_of(body)
    elif md5 == "wrong":
        headers["Content-MD5"] = draw(printable_ascii)
    if draw(st.booleans()):
        headers["Content-Type"] = draw(
            st.sampled_from(["application/json", "text/plain", "", "x/y; charset=nope"])
        )
    return headers


# ---- Fuzzing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES, ids=[f"{route.method} {route.path}" for route in ROUTES])
@fuzz_settings(default_examples=PER_ROUTE_EXAMPLES)
@given(data=st.data())
async def test_fuzzed_requests_to_every_route_never_5xx(
    client: Client, route: web.RouteDef, data: st.DataObject
) -> None:
    """Each route with valid credentials and random path values, query, headers and body: no 5xx.

    One test per route, so that hypothesis's preference for early choices cannot starve one.
    """
    # Mostly the route's own method; sometimes another one on its path.
    method = route.method if data.draw(st.integers(min_value=0, max_value=9)) else data.draw(methods)
    path = data.draw(route_paths(route.path))
    query = data.draw(queries)
    body = data.draw(bodies)
    headers = {**data.draw(st.sampled_from([AUTH, BEARER])), **data.draw(extra_headers(body))}
    response = await client.request(method, path + ("?" + query if query else ""), data=body, headers=headers)
    await assert_well_formed(method, response)


@fuzz_settings()
@given(data=st.data())
async def test_fuzzed_requests_to_any_path_never_5xx(client: Client, data: st.DataObject) -> None:
    """Random method, path (often no route), credentials (often wrong) and body: 4xx at worst."""
    method = data.draw(methods)
    path = data.draw(any_paths | route_paths())
    body = data.draw(bodies)
    headers = {**data.draw(authorizations), **data.draw(extra_headers(body))}
    response = await client.request(method, path, data=body, headers=headers)
    await assert_well_formed(method, response)
    assert (await client.get("/healthz")).status == 200


# ---- Requests that once crashed a handler ----------------------------------------------------------

DEEP_INFO = b'{"ID":"x","Info":' + b"[" * 5000 + b"]" * 5000 + b"}"
# Within what the JSON parser takes, but deep enough that a later read of the stored lock
# (GET /api/v1/projects, from a deeper stack) ran out of recursion.
NEAR_LIMIT_INFO = b'{"ID":"x","Info":' + b"[" * 977 + b"]" * 977 + b"}"
STATE_HEAD = b'{"version":4,"serial":1,"lineage":"x"'


@pytest.mark.parametrize(
    ("method", "path", "body", "message"),
    [
        pytest.param("LOCK", "/state/lab/lock", DEEP_INFO, "nested", id="lock-deep"),
        pytest.param("LOCK", "/state/lab/lock", NEAR_LIMIT_INFO, "nested", id="lock-near-limit"),
        pytest.param("POST", "/state/lab/lock", DEEP_INFO, "nested", id="gitlab-lock-deep"),
        pytest.param("LOCK", "/state/lab/lock", b'{"ID":"\\ud800"}', "Unicode", id="lock-id-surrogate"),
        pytest.param(
            "LOCK", "/state/lab/lock", b'{"ID":"x","n":' + b"9" * 5000 + b"}", "digits", id="lock-digits"
        ),
        pytest.param(
            "LOCK", "/state/lab/lock", b'{"ID":"x","Who":"\\udfff"}', "Unicode", id="lock-who-surrogate"
        ),
        pytest.param("UNLOCK", "/state/lab/lock", DEEP_INFO, "nested", id="unlock-deep"),
        pytest.param("DELETE", "/state/lab/lock", b"[" * 100_000, "nested", id="unlock-deep-and-large"),
        pytest.param("UNLOCK", "/state/lab/lock", b'{"ID":"\\udc80"}', "Unicode", id="unlock-id-surrogate"),
        pytest.param("POST", "/state/lab", b"[" * 100_000, "nested too deeply", id="state-deep"),
        pytest.param(
            "POST", "/state/lab", STATE_HEAD + b',"n":' + b"9" * 5000 + b"}", "digits", id="state-digits"
        ),
        pytest.param(
            "POST",
            "/state/lab",
            b'{"version":4,"serial":9223372036854775808,"lineage":"x"}',
            "'serial' must be at most",
            id="state-serial-2^63",
        ),
        pytest.param("PUT", "/state/lab", STATE_HEAD + b',"x":"\\ud800"}', "Unicode", id="state-surrogate"),
        pytest.param(
            "GET", "/api/v1/projects/lab/states/%C2%B2", b"", "non-negative integer", id="serial-superscript"
        ),
    ],
)
async def test_bodies_that_crashed_a_handler_are_400(
    client: Client, method: str, path: str, body: bytes, message: str
) -> None:
    """Nesting, digit and Unicode limits and out-of-range numbers are a 400 naming the problem."""
    response = await client.request(method, path, data=body, headers=AUTH)
    assert response.status == 400
    assert message in (await response.json())["message"]
    assert (await client.get("/state/lab", headers=AUTH)).status == 204
    projects = await client.get("/api/v1/projects", headers=AUTH)
    assert (projects.status, (await projects.json())["items"]) == (200, [])


@pytest.mark.parametrize(
    "project",
    [
        "..%2Fetc",
        "%2Fetc%2Fpasswd",
        "a%2F..%2F..%2Fb",
        ".hidden",
        "-rf",
        "%00",
        "a%0Ab",
        "lab%20x",
        "x" * 129,
    ],
)
@pytest.mark.parametrize(
    ("method", "template"),
    [
        ("GET", "/state/{}"),
        ("LOCK", "/state/{}/lock"),
        ("GET", "/api/v1/projects/{}"),
        ("GET", "/api/v1/projects/{}/vms"),
    ],
)
async def test_project_path_traversal_is_refused(
    client: Client, method: str, template: str, project: str
) -> None:
    """Encoded slashes, leading dots or dashes and control characters never name a project: 400 or 404.

    (Plain `..` segments are resolved by URL rules before routing, so they only ever reach another
    route, with the same credentials check.)
    """
    response = await client.request(method, template.format(project), data=b'{"ID": "x"}', headers=AUTH)
    assert response.status in (400, 404)
    assert (await response.json())["code"] == response.status
    assert (await (await client.get("/api/v1/projects", headers=AUTH)).json())["items"] == []


# ---- Limits ----------------------------------------------------------------------------------------

VM_COUNT = 10_000


async def test_state_with_10000_vms_is_stored_and_the_server_stays_responsive(
    make_client: Any, settings: Any
) -> None:
    """10,000 VMs in one state (5 MiB): stored and published; probes answer meanwhile.

    There is no limit on VMs per state: only max_body_bytes bounds it (docs/security.md).
    """
    client = await make_client(settings.model_copy(update={"max_body_bytes": 64 * 1024 * 1024}))
    body = encode(vm_state(1, {f"vm-{index}": {} for index in range(VM_COUNT)}))
    worst_probe = 0.0

    async def probe_until(done: asyncio.Event) -> None:
        nonlocal worst_probe
        while not done.is_set():
            started = time.monotonic()
            assert (await client.get("/healthz")).status == 200
            worst_probe = max(worst_probe, time.monotonic() - started)
            await asyncio.sleep(0.02)

    done = asyncio.Event()
    prober = asyncio.create_task(probe_until(done))
    try:
        response = await client.post("/state/lab", data=body, headers=AUTH)
    finally:
        done.set()
        await prober
    assert response.status == 200
    assert (await response.json())["published"] is True
    project = await (await client.get("/api/v1/projects/lab", headers=AUTH)).json()
    assert project["vmCount"] == VM_COUNT
    assert worst_probe < 1.0, f"/healthz took {worst_probe:.2f} s while the state was stored"
