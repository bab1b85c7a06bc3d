"""Request validation (mesh/schemas.py, mesh/api.py) without a mesh: every
bound a value must keep to reach Raft (msgpack) and storage (INTEGER columns)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from raftmesh.mesh.api import SUBMIT_FIELDS, validate_submission
from raftmesh.mesh.errors import BadRequest
from raftmesh.mesh.openapi import openapi_document
from raftmesh.mesh.schemas import JoinRequest, check_nesting, parse_request
from raftmesh.runner.context import pack


def ok(**fields: Any) -> dict[str, Any]:
    return validate_submission({"agent": "echo", "input": 1, **fields})


def refused(body: Any) -> str:
    with pytest.raises(BadRequest) as info:
        validate_submission(body)
    return info.value.message


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"priority": 2**64}, "'priority' must be an integer from -2147483648 to 2147483647"),
        ({"priority": 2**31}, "'priority'"),
        ({"priority": -(2**31) - 1}, "'priority'"),
        ({"priority": True}, "'priority'"),
        ({"max_attempts": 0}, "'max_attempts'"),
        ({"max_attempts": 2**31}, "'max_attempts'"),
        ({"timeout_s": float("nan")}, "'timeout_s'"),
        ({"timeout_s": float("inf")}, "'timeout_s'"),
        ({"timeout_s": -1}, "'timeout_s'"),
        ({"budget": {"tokens": 2**63}}, "'budget'"),
        ({"budget": {"dollars": 1}}, "'budget'"),
        ({"memory_limit_mb": 15}, "'memory_limit_mb'"),
        ({"memory_limit_mb": 2**31}, "'memory_limit_mb'"),
        ({"idempotency_key": "é" * 129}, "256 bytes"),
        ({"labels": {"k": 1}}, "'labels'"),
        ({"labels": {str(i): "v" for i in range(65)}}, "'labels'"),
        ({"isolation": "vm"}, "'isolation' must be one of task, process"),
        ({"placement": "random"}, "'placement'"),
        ({"agent": ""}, "'agent'"),
        ({"surprise": 1}, "unknown fields: surprise"),
    ],
)
def test_out_of_bounds_fields_are_refused_with_the_bound(
    fields: dict[str, Any], words: str
) -> None:
    assert words in refused({"agent": "echo", "input": 1, **fields})


def test_values_at_the_bounds_pass_and_fit_msgpack() -> None:
    spec = ok(
        priority=2**31 - 1,
        max_attempts=2**31 - 1,
        timeout_s=1e9,
        budget={"tokens": 2**63 - 1, "model_calls": 0},
        memory_limit_mb=2**31 - 1,
        idempotency_key="é" * 128,
        labels={str(i): "v" for i in range(64)},
    )
    assert spec["priority"] == 2**31 - 1 and set(spec) == set(SUBMIT_FIELDS)
    pack(spec)
    assert ok(priority=-(2**31))["priority"] == -(2**31)
    assert ok(timeout_s=3)["timeout_s"] == 3.0


def test_missing_fields_keep_their_messages() -> None:
    assert "missing field 'agent': name the agent" in refused({"input": 1})
    assert "missing field 'input'" in refused({"agent": "echo"})
    assert "JSON object" in refused([1, 2])


def test_nesting_is_checked_without_recursion() -> None:
    deep: Any = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(BadRequest, match="more than 64 levels"):
        check_nesting(deep)
    assert "64 levels" in refused({"agent": "echo", "input": deep})
    fits: Any = 1
    for _ in range(63):
        fits = {"k": fits}
    ok(input=fits)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"id": "p", "http": "h:1", "raft": "zz:yy"}, "field 'raft' must be HOST:PORT"),
        ({"id": "p", "http": "h:1", "raft": "h:65536"}, "field 'raft'"),
        ({"id": "p", "http": "h:1"}, "a voter needs one"),
        ({"id": "p", "http": "nohost", "role": "executor"}, "field 'http'"),
        ({"id": "", "http": "h:1", "role": "executor"}, "field 'id'"),
        ({"id": "p", "http": "h:1", "role": "boss"}, "field 'role'"),
    ],
)
def test_joins_with_unusable_addresses_are_refused(body: dict[str, Any], words: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_request(body, JoinRequest)
    assert words in info.value.message


def test_joins_with_usable_addresses_pass() -> None:
    assert parse_request({"id": "p", "http": "h:1", "raft": "[::1]:65535"}, JoinRequest).raft
    executor = parse_request({"id": "p", "http": "10.0.0.1:80", "role": "executor"}, JoinRequest)
    assert executor.raft is None


def test_openapi_document_is_valid_json_with_every_given_route() -> None:
    doc = openapi_document([("POST", "/v1/runs"), ("GET", "/v1/runs/{id}"), ("HEAD", "/x")])
    assert set(doc["paths"]) == {"/v1/runs", "/v1/runs/{id}"}
    assert doc["paths"]["/v1/runs/{id}"]["get"]["parameters"][0]["name"] == "id"
    msgspec.json.decode(msgspec.json.encode(doc))
    assert "SubmitRequest" in doc["components"]["schemas"]


def test_the_spelled_out_literals_match_the_runtime_tuples() -> None:
    from typing import get_args

    from raftmesh.consensus.model import ROLES
    from raftmesh.consensus.spec import PLACEMENTS
    from raftmesh.mesh import schemas
    from raftmesh.runner.context import BUDGET_KEYS
    from raftmesh.runner.isolation import ISOLATION_MODES

    assert get_args(schemas.BudgetKey) == tuple(BUDGET_KEYS)
    assert get_args(schemas.IsolationMode) == tuple(ISOLATION_MODES)
    assert get_args(schemas.PlacementName) == tuple(PLACEMENTS)
    assert set(get_args(schemas.RoleName)) == set(ROLES)


def test_a_nul_in_a_label_key_is_refused_like_one_in_its_value() -> None:
    """Found by schemathesis: PostgreSQL JSONB cannot hold NUL, and a run whose
    label key had one was accepted, then could never be recorded (its cancel
    settled forever and answered 503)."""
    from raftmesh.consensus.spec import RunSpec, SpecError

    for labels in ({"k\x00": "v"}, {"k": "v\x00"}):
        with pytest.raises(SpecError, match="labels"):
            RunSpec.from_wire({"agent": "a", "input": 1, "labels": labels})


def test_a_signal_body_and_its_route_document_what_the_mesh_accepts() -> None:
    from raftmesh.consensus.waits import SIGNAL_NAME
    from raftmesh.mesh.schemas import SignalRequest

    assert parse_request({}, SignalRequest).data is None
    assert parse_request({"data": {"approve": True}, "idempotency_key": "k"}, SignalRequest).data
    for body, words in (
        ({"data": 1, "colour": "red"}, "unknown fields: colour"),
        ({"idempotency_key": "é" * 129}, "'idempotency_key'"),
        ({"idempotency_key": 7}, "'idempotency_key'"),
        ({"idempotency_key": "k\x00"}, "'idempotency_key'"),
        ({"idempotency_key": "\ud832"}, "'idempotency_key'"),
        ([1], "JSON object"),
    ):
        with pytest.raises(BadRequest) as info:
            parse_request(body, SignalRequest)
        assert words in info.value.message, (body, info.value.message)
    route = "/v1/runs/{id}/signals/{name}"
    doc = openapi_document([("POST", route)])
    params = {p["name"]: p for p in doc["paths"][route]["post"]["parameters"]}
    assert set(params) == {"id", "name"}
    assert params["name"]["schema"]["pattern"] == f"^{SIGNAL_NAME.pattern}$"
    assert "SignalResponse" in doc["components"]["schemas"]
