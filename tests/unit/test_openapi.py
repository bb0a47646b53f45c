"""The OpenAPI document (sidecar/openapi.py) against the code it describes."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest
from schemathesis.specs.openapi.definitions import OPENAPI_31

from sidecar.api import ROUTES, status_body
from sidecar.keys import RUN_ID_PATTERN
from sidecar.openapi import openapi_document
from sidecar.replay import ReplayBody
from sidecar.store import RunMeta

METHODS = ("get", "post", "put", "patch", "delete", "head", "options")


def operations(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method.upper(), path): op
        for path, item in doc["paths"].items()
        for method, op in item.items()
        if method in METHODS
    }


@pytest.mark.parametrize("auth", [True, False])
def test_it_is_a_valid_openapi_3_1_document(auth: bool) -> None:
    doc = openapi_document(auth=auth)
    assert doc["openapi"] == "3.1.0"
    jsonschema.Draft202012Validator(OPENAPI_31).validate(doc)


@pytest.mark.parametrize("auth", [True, False])
def test_every_route_is_documented_and_nothing_else(auth: bool) -> None:
    documented = {
        key: op["operationId"] for key, op in operations(openapi_document(auth=auth)).items()
    }
    assert documented == {(method, path): name for method, path, _, name in ROUTES}


def test_with_auth_every_run_route_needs_a_token_and_documents_401_and_403() -> None:
    for (method, path), op in operations(openapi_document(auth=True)).items():
        if path == "/sidecar/v1/openapi.json":
            assert op["security"] == []
            continue
        assert op["security"] == [{"bearer": []}, {"query_token": []}], (method, path)
        if path == "/v1/responses/{response_id}":
            # Its refusals share "default" with the upstream's own answers (it proxies).
            assert "default" in op["responses"]
            continue
        assert {"401", "403"} <= set(op["responses"]), (method, path)


def test_without_auth_nothing_needs_a_token() -> None:
    for op in operations(openapi_document(auth=False)).values():
        assert "security" not in op
        assert not {"401", "403"} & set(op["responses"])


def test_the_replay_body_schema_has_the_models_fields() -> None:
    schema = openapi_document(auth=False)["components"]["schemas"]["ReplayBody"]
    assert set(schema["properties"]) == set(ReplayBody.model_fields)


def test_the_status_schema_requires_every_field_the_route_sends() -> None:
    schema = openapi_document(auth=False)["components"]["schemas"]["RunStatus"]
    meta = RunMeta.from_hash("r", {b"status": b"running"})
    body = status_body(meta)
    assert set(schema["required"]) == set(body) == set(schema["properties"])
    jsonschema.Draft202012Validator(schema).validate(body)


def test_the_run_id_parameter_is_the_codes_pattern() -> None:
    schema = openapi_document(auth=False)["components"]["parameters"]["RunId"]["schema"]
    assert schema["pattern"] == f"^{RUN_ID_PATTERN}$"
