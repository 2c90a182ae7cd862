"""The OpenAPI document: every route is in it, every reference resolves, every schema is valid."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import jsonschema
import pytest

from api.openapi import COMPONENT_MODELS, Op, build_document
from api.server.routes import ROUTES, document
from api.types import ObjectMeta, QemuVM, QemuVMStatus

DOCUMENT = document()
OPENAPI_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
# The dashboard serves HTML pages to browsers; it is not an API to describe.
NOT_API = re.compile(r"/ui(/|$)")


def api_routes() -> list[tuple[str, str]]:
    return sorted({(route.method, route.path) for route in ROUTES if not NOT_API.match(route.path)})


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


@pytest.mark.parametrize(("method", "path"), api_routes(), ids=[f"{m} {p}" for m, p in api_routes()])
def test_every_route_is_documented(method: str, path: str) -> None:
    """Each (method, path) of the router is an operation, or (LOCK, UNLOCK) in the path's x-methods."""
    item = DOCUMENT["paths"].get(path)
    assert item is not None, f"{path} is not in the OpenAPI document"
    if method.lower() in OPENAPI_METHODS:
        assert method.lower() in item, f"{method} {path} is not documented"
    else:
        assert method in item.get("x-methods", []), f"{method} {path} is not in x-methods"


def test_no_documented_path_is_missing_from_the_router() -> None:
    """The document describes only routes that exist."""
    served = {path for _method, path in api_routes()}
    assert set(DOCUMENT["paths"]) <= served


def test_every_reference_resolves() -> None:
    """Each $ref names a schema in components."""
    schemas = DOCUMENT["components"]["schemas"]
    for ref in refs(DOCUMENT):
        assert ref.startswith("#/components/schemas/")
        assert ref.removeprefix("#/components/schemas/") in schemas, ref


def test_components_are_valid_json_schema_for_every_model() -> None:
    """Every model the API answers with is a component, and each is valid JSON Schema 2020-12."""
    schemas = DOCUMENT["components"]["schemas"]
    assert {model.__name__ for model in COMPONENT_MODELS} <= set(schemas)
    for schema in schemas.values():
        jsonschema.Draft202012Validator.check_schema(schema)


def test_path_parameters_are_declared() -> None:
    """Every {placeholder} of a path is a declared path parameter of each of its operations."""
    for path, item in DOCUMENT["paths"].items():
        placeholders = set(re.findall(r"\{(\w+)\}", path))
        for method, operation in item.items():
            if method not in OPENAPI_METHODS:
                continue
            declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert declared == placeholders, f"{method} {path}"


def test_security_is_basic_or_bearer_except_probes() -> None:
    """Both schemes are declared and required globally; only the probes opt out."""
    assert set(DOCUMENT["components"]["securitySchemes"]) == {"basicAuth", "bearerAuth"}
    assert DOCUMENT["security"] == [{"basicAuth": []}, {"bearerAuth": []}]
    public = {path for path, item in DOCUMENT["paths"].items() if item.get("get", {}).get("security") == []}
    assert public == {"/healthz", "/readyz"}


def test_a_served_qemuvm_validates_against_its_component() -> None:
    """The QemuVM schema (by alias) accepts an object as the API renders it."""
    vm = QemuVM(
        metadata=ObjectMeta(
            project="lab",
            name="web",
            uid="u",
            generation=1,
            creation_timestamp=datetime.now(UTC),
            state_serial=1,
        ),
        spec={"memory": 256},
        status=QemuVMStatus(),
    ).model_dump(mode="json", by_alias=True)
    schema = {"$ref": "#/components/schemas/QemuVM", "components": DOCUMENT["components"]}
    jsonschema.Draft202012Validator(schema).validate(vm)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate({**vm, "kind": "Pod"})


def test_paths_come_from_the_routes_and_their_models() -> None:
    """build_document takes the routes: path parameters from the placeholders, the 200 body from
    the route's model, methods OpenAPI lacks in x-methods."""
    document = build_document(
        [
            ("GET", "/things/{project}/{name}", Op("One thing", model="QemuVM", errors=(404,))),
            ("LOCK", "/things/{project}/lock", Op("take it")),
        ]
    )
    operation = document["paths"]["/things/{project}/{name}"]["get"]
    assert [p["name"] for p in operation["parameters"]] == ["project", "name"]
    assert operation["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/QemuVM"
    }
    assert set(operation["responses"]) == {"200", "401", "404", "429"}
    assert document["paths"]["/things/{project}/lock"]["x-methods"] == ["LOCK"]


def test_qemuvm_writes_are_documented_as_refused() -> None:
    item = DOCUMENT["paths"]["/apis/tofu-qemu.dev/v1alpha1/namespaces/{project}/qemuvms/{name}"]
    for method in ("put", "patch", "delete"):
        assert set(item[method]["responses"]) == {"405"}
