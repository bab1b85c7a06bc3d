"""schemathesis against a live 3-peer mesh (TLS, a tokens file, PostgreSQL):
every answer is a documented status with a body that matches /v1/openapi.json,
and none is a 5xx, for a tenant token and for an admin token (issue 10).

Bounded: at most 25 examples per operation and 45 s per token. The event
stream is left out (a stream of a live run does not end within a request) and
so are the membership changes for the admin (a fuzzed drain or leave would
take the mesh apart under the fuzzer); a tenant token tries them all (403)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from raftmesh.chaos.secure import make_secure_setup

pytestmark = pytest.mark.slow

CHECKS = ",".join(
    (
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
    )
)


async def _schemathesis(url: str, token: str, ca: Path, exclude: str, cwd: Path) -> tuple[int, str]:
    """Runs in ``cwd``: schemathesis keeps its example database there."""
    st = Path(sys.executable).with_name("st")
    proc = await asyncio.create_subprocess_exec(
        str(st),
        "run",
        f"{url}/v1/openapi.json",
        "--tls-verify",
        str(ca),
        "--header",
        f"Authorization: Bearer {token}",
        "--max-examples",
        "25",
        "--max-time",
        "45",
        "--seed",
        "1",
        "--checks",
        CHECKS,
        "--exclude-path-regex",
        exclude,
        "--no-color",
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace")


@pytest.mark.timeout(240)
async def test_the_api_answers_as_its_openapi_document_says(make_mesh, tmp_path):
    setup = make_secure_setup(tmp_path / "secure")
    mesh = await make_mesh("postgres", env=setup.peer_env())
    tenant = setup.tenant_tokens["alpha"]
    code, out = await _schemathesis(mesh.peers[0].url, tenant, setup.ca, r"/events$", tmp_path)
    print(out[-3000:])
    assert code == 0, out[-6000:]
    admin_exclude = r"(/events$|^/internal/|^/v1/peers)"
    code, out = await _schemathesis(
        mesh.peers[1].url, setup.admin_token, setup.ca, admin_exclude, tmp_path
    )
    print(out[-3000:])
    assert code == 0, out[-6000:]
