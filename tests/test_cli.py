"""The `mesh` command's parsing and error paths, and MeshClient against the HTTP contract.

`mesh up` hands its Settings to ``mesh.peer.run``; a stand-in module captures
them so the tests check exactly what a peer would be started with, without
starting one. The client tests use a small aiohttp app that speaks the v1
contract's shapes, including its error body and Retry-After.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from click.testing import CliRunner

from raftmesh.cli.main import main
from raftmesh.mesh.client import MeshClient, MeshHTTPError
from raftmesh.mesh.settings import Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own MESH_* variables must not leak into what is tested."""
    for name in list(os.environ):
        if name.startswith("MESH_"):
            monkeypatch.delenv(name)


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[Settings]:
    """Settings that `mesh up` passed to mesh.peer.run; run exits with code 3."""
    seen: list[Settings] = []

    def run(settings: Settings) -> int:
        seen.append(settings)
        return 3

    fake = types.ModuleType("raftmesh.mesh.peer")
    fake.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "raftmesh.mesh.peer", fake)
    return seen


def invoke(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(main, list(args), env=env)


def test_up_passes_flags_to_the_peer(started: list[Settings], tmp_path: Path) -> None:
    result = invoke(
        "up",
        "--id",
        "peer-7",
        "--raft",
        "127.0.0.1:7101",
        "--http",
        "127.0.0.1:8201",
        "--peers",
        "127.0.0.1:7102, 127.0.0.1:7103",
        "--storage",
        f"sqlite:///{tmp_path}/m.db",
        "--data-dir",
        str(tmp_path / "d"),
        "--slots",
        "2",
        "--labels",
        "gpu=a100,pool=batch",
        "--secret",
        "s3cret",
    )
    assert result.exit_code == 3, result.output
    (settings,) = started
    assert settings.id == "peer-7"
    assert settings.peers == ("127.0.0.1:7102", "127.0.0.1:7103")
    assert settings.slots == 2
    assert settings.labels == {"gpu": "a100", "pool": "batch"}
    assert settings.secret == "s3cret"


def test_up_takes_the_log_level_and_format(started: list[Settings]) -> None:
    assert invoke("up", "--log-level", "debug", "--log-format", "logfmt").exit_code == 3
    assert (started[0].log_level, started[0].log_format) == ("debug", "logfmt")
    refused = invoke("up", "--log-level", "loud")
    assert refused.exit_code == 2 and "--log-level" in refused.output


def test_up_slots_must_be_an_integer(started: list[Settings]) -> None:
    result = invoke("up", "--slots", "x")
    assert result.exit_code == 2
    assert "Invalid value for '--slots': 'x' is not a valid integer" in result.output
    assert started == []


def test_up_env_is_used_and_flags_win(started: list[Settings]) -> None:
    assert invoke("up", env={"MESH_SLOTS": "7", "MESH_ID": "from-env"}).exit_code == 3
    assert invoke("up", "--slots", "1", env={"MESH_SLOTS": "7"}).exit_code == 3
    assert [(s.id, s.slots) for s in started] == [("from-env", 7), ("peer-1", 1)]


def test_up_bad_env_value_is_one_clear_line(started: list[Settings]) -> None:
    result = invoke("up", env={"MESH_SLOTS": "many"})
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith("Error: ") and "slots" in line and "'many'" in line
    assert started == []


def test_up_refuses_non_loopback_without_secret(started: list[Settings]) -> None:
    result = invoke("up", "--raft", "10.1.2.3:7001", "--http", "0.0.0.0:8001")
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith("Error: ") and "MESH_SECRET_FILE" in line
    assert started == []
    assert invoke("up", "--raft", "10.1.2.3:7001", env={"MESH_SECRET": "x"}).exit_code == 3


def test_up_reads_a_toml_file_under_env_and_flags(started: list[Settings], tmp_path: Path) -> None:
    config = tmp_path / "mesh.toml"
    config.write_text('id = "from-file"\nslots = 9\npeer_ttl_s = 3.5\nlabels = {zone = "a"}\n')
    assert invoke("up", "--config", str(config), "--id", "from-flag").exit_code == 3
    (settings,) = started
    assert (settings.id, settings.slots, settings.peer_ttl_s) == ("from-flag", 9, 3.5)
    assert settings.labels == {"zone": "a"}

    config.write_text("slotz = 3\n")
    result = invoke("up", "--config", str(config))
    assert result.exit_code == 2
    assert "unknown settings" in result.output and "slotz" in result.output


def test_up_missing_config_file_is_a_clear_error(started: list[Settings], tmp_path: Path) -> None:
    result = invoke("up", "--config", str(tmp_path / "absent.toml"))
    assert result.exit_code == 2
    assert "absent.toml" in result.output
    assert started == []


def test_submit_rejects_malformed_json() -> None:
    result = invoke("submit", "echo", "--input", "{bad")
    assert result.exit_code == 2
    assert "Invalid value for '--input': not valid JSON" in result.output


def test_signal_refuses_malformed_data_in_one_line_before_sending() -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    result = invoke("signal", "r1", "go", "--data", "{bad", "--peer", url)
    assert result.exit_code == 1
    assert result.output.startswith("Error: --data is not valid JSON")
    assert result.output.count("\n") == 1, result.output
    assert "cannot reach" not in result.output, "nothing was sent"


def test_client_commands_report_an_unreachable_peer() -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    result = invoke("run", "some-id", "--peer", url)
    assert result.exit_code == 1
    assert f"cannot reach {url}" in result.output
    # MESH_PEER_URL is the default for --peer.
    result = invoke("status", env={"MESH_PEER_URL": url})
    assert f"cannot reach {url}" in result.output
    for command in (["pause", "r1"], ["resume", "r1"], ["signal", "r1", "go", "--data", "1"]):
        result = invoke(*command, "--peer", url)
        assert result.exit_code == 1 and f"cannot reach {url}" in result.output, command


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- MeshClient against the contract's shapes --------------------------------


class ContractStandIn:
    """Just enough of the v1 API to exercise the client: one run that finishes
    on the third poll, an unknown run, and a cluster without quorum."""

    def __init__(self) -> None:
        self.bodies: list[Any] = []
        self.polls = 0
        self.auth: list[str | None] = []
        self.app = web.Application()
        self.app.router.add_post("/v1/runs", self.submit)
        self.app.router.add_get("/v1/runs", self.list_runs)
        self.app.router.add_get("/v1/runs/{id}", self.get_run)
        self.app.router.add_get("/v1/cluster", self.cluster)
        self.app.router.add_get("/readyz", self.readyz)

    async def submit(self, request: web.Request) -> web.Response:
        self.auth.append(request.headers.get("Authorization"))
        self.bodies.append(await request.json())
        return web.json_response({"id": "r1", "status": "queued"}, status=202)

    async def list_runs(self, request: web.Request) -> web.Response:
        return web.json_response({"runs": [], "query": dict(request.query)})

    async def get_run(self, request: web.Request) -> web.Response:
        if request.match_info["id"] != "r1":
            return web.json_response(
                {"error": {"code": "not_found", "message": "no run 'nope'"}}, status=404
            )
        self.polls += 1
        if self.polls == 2:
            return _no_quorum()
        return web.json_response(
            {"id": "r1", "status": "succeeded" if self.polls >= 3 else "running"}
        )

    async def cluster(self, request: web.Request) -> web.Response:
        return _no_quorum()

    async def readyz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")


def _no_quorum() -> web.Response:
    return web.json_response(
        {"error": {"code": "no_quorum", "message": "no leader"}},
        status=503,
        headers={"Retry-After": "1"},
    )


async def test_client_speaks_the_contract() -> None:
    stand_in = ContractStandIn()
    async with TestServer(stand_in.app) as server:
        async with MeshClient(str(server.make_url("/")), token="t0k") as client:
            assert await client.submit("echo", {"x": 1}, tenant="acme", priority=5) == {
                "id": "r1",
                "status": "queued",
            }
            assert stand_in.bodies == [
                {"agent": "echo", "input": {"x": 1}, "tenant": "acme", "priority": 5}
            ]
            assert stand_in.auth == ["Bearer t0k"]
            listed = await client.list_runs(status="running", limit=10)
            assert listed["query"] == {"status": "running", "limit": "10"}

            # The 503 on the second poll is waited out, not raised.
            assert (await client.wait("r1", timeout_s=10, poll_s=0.01))["status"] == "succeeded"

            with pytest.raises(MeshHTTPError) as missing:
                await client.get_run("nope")
            assert (missing.value.status, missing.value.code) == (404, "not_found")
            assert missing.value.message == "no run 'nope'"

            with pytest.raises(MeshHTTPError) as unavailable:
                await client.cluster()
            assert (unavailable.value.status, unavailable.value.retry_after) == (503, 1.0)

            assert await client.readyz() is True
            assert await client.healthz() is False  # the stand-in has no /healthz


async def test_client_wait_times_out_and_probes_report_unreachable() -> None:
    stand_in = ContractStandIn()
    async with TestServer(stand_in.app) as server:
        async with MeshClient(str(server.make_url("/"))) as client:
            with pytest.raises(TimeoutError, match="r1"):
                await client.wait("r1", timeout_s=0, poll_s=0.01)
    async with MeshClient(f"http://127.0.0.1:{_closed_port()}", timeout_s=2) as client:
        assert await client.readyz() is False


# --- the README's quick-start demo, end to end --------------------------------


@pytest.mark.slow
def test_demo_kills_a_peer_and_every_run_finishes(tmp_path: Path) -> None:
    demo = subprocess.run(
        [sys.executable, "-m", "raftmesh.cli", "demo", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "kill -9 peer-" in demo.stdout
    assert "no step ran twice" in demo.stdout
    assert "All 6 runs succeeded" in demo.stdout


# --- `mesh dev` and the client commands against it ---------------------------


def _mesh(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "raftmesh.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


@pytest.mark.slow
def test_dev_mesh_serves_the_client_commands_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    dev = subprocess.Popen(
        [sys.executable, "-m", "raftmesh.cli", "dev", "--nodes", "3", "--dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    try:
        assert dev.stdout is not None
        lines = []
        for line in dev.stdout:  # ready and its hints, or the dev mesh exits
            lines.append(line)
            if "mesh status" in line:
                break
        assert any("mesh ready" in line for line in lines), "".join(lines)
        url = next(
            (line.split("=", 1)[1].strip() for line in lines if "export MESH_PEER_URL=" in line),
            "http://127.0.0.1:8101",
        )
        env = {**os.environ, "MESH_PEER_URL": url}
        submitted = _mesh("submit", "echo", "--input", '{"hello": 1}', "--wait", env=env)
        assert submitted.returncode == 0, submitted.stderr
        run = json.loads(submitted.stdout)
        assert (run["status"], run["result"]) == ("succeeded", {"hello": 1})
        shown = _mesh("run", run["id"], env=env)
        assert json.loads(shown.stdout)["owner"] == run["owner"]
        status = _mesh("status", env={**env, "COLUMNS": "200"})
        assert status.returncode == 0, status.stderr
        assert "(leader)" in status.stdout
        for peer in ("peer-1", "peer-2", "peer-3"):
            assert peer in status.stdout
        assert "waiting" in status.stdout and "paused" in status.stdout
        top = _mesh("top", "--once", env={**env, "COLUMNS": "200"})
        assert top.returncode == 0, top.stderr
        assert "leader peer-" in top.stdout and "(leader)" in top.stdout
        assert "waiting 0" in top.stdout and "paused 0" in top.stdout
        unknown = _mesh("run", "no-such-run", env=env)
        assert unknown.returncode != 0 and "no run with id" in unknown.stderr
        agents = _mesh("agents", env={**env, "COLUMNS": "200"})
        assert agents.returncode == 0 and "steps" in agents.stdout, agents.stderr
        sleeper = json.loads(_mesh("submit", "sleep", "--input", '{"seconds": 60}', env=env).stdout)
        cancel = _mesh("cancel", sleeper["id"], env=env)
        assert cancel.returncode == 0, cancel.stderr
        deadline = time.monotonic() + 30
        while json.loads(_mesh("run", sleeper["id"], env=env).stdout)["status"] != "cancelled":
            assert time.monotonic() < deadline, "mesh cancel did not end the run"
            time.sleep(0.5)
        retry = _mesh("retry", sleeper["id"], env=env)
        assert retry.returncode != 0 and "409" in retry.stderr, retry.stderr
    finally:
        dev.send_signal(signal.SIGINT)
        out, _ = dev.communicate(timeout=60)
    assert dev.returncode == 0, out
    leftovers = subprocess.run(
        ["pgrep", "-f", str(tmp_path)], capture_output=True, text=True
    ).stdout.split()
    assert leftovers == [], "Ctrl-C left peer processes behind"


def test_no_constant_secret_is_left_in_the_code() -> None:
    """The old built-in secret let any local process forge Raft frames."""
    package = Path(__file__).resolve().parent.parent
    hits = [
        str(p)
        for d in ("mesh", "cli", "consensus", "runner", "storage", "chaos")
        for p in (package / d).rglob("*.py")
        if "insecure-development-secret" in p.read_text()
    ]
    assert hits == []


def test_up_refuses_a_non_loopback_dial_target_without_secret(started: list[Settings]) -> None:
    """Every address but the dial target is loopback: the Raft traffic still
    leaves the machine, so a made-up secret is not enough."""
    result = invoke(
        "up", "--peers", "127.0.0.1:7002", env={"MESH_DIAL": "127.0.0.1:7002=10.9.8.7:7002"}
    )
    assert result.exit_code == 2, result.output
    assert "MESH_SECRET_FILE" in result.output and "dial target" in result.output
    assert started == []


def test_secrets_come_from_files(started: list[Settings], tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("from-a-file\n")
    (tmp_path / "token").write_text("token-from-a-file\n")
    env = {
        "MESH_SECRET_FILE": str(tmp_path / "secret"),
        "MESH_API_TOKEN_FILE": str(tmp_path / "token"),
    }
    result = invoke("up", "--raft", "10.1.2.3:7001", env=env)
    assert result.exit_code == 3, result.output
    assert "deprecated" not in result.output
    (settings,) = started
    assert (settings.secret, settings.api_token) == ("from-a-file", "token-from-a-file")
    assert "from-a-file" not in repr(settings)

    result = invoke("up", env={**env, "MESH_SECRET": "also"})
    assert result.exit_code == 2 and "keep only MESH_SECRET_FILE" in result.output
    result = invoke("up", env={"MESH_SECRET_FILE": str(tmp_path / "absent")})
    assert result.exit_code == 2 and "cannot read the secret" in result.output


def test_secret_flags_are_deprecated(started: list[Settings]) -> None:
    result = invoke("up", "--secret", "s", "--api-token", "t")
    assert result.exit_code == 3, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, lines
    assert "--secret is deprecated" in lines[0] and "MESH_SECRET_FILE" in lines[0]
    assert "--api-token is deprecated" in lines[1] and "MESH_API_TOKEN_FILE" in lines[1]
    assert started[0].secret == "s" and started[0].api_token == "t"
    # The same values from the environment: no warning.
    result = invoke("up", env={"MESH_SECRET": "s", "MESH_API_TOKEN": "t"})
    assert result.exit_code == 3 and result.stderr == ""


def test_client_token_flag_is_deprecated_and_the_file_is_read(tmp_path: Path) -> None:
    """--token warns; MESH_API_TOKEN_FILE is sent like MESH_API_TOKEN."""
    seen: list[str | None] = []

    async def cluster(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.json_response({"self": "peer-1", "leader": "peer-1", "peers": [], "voters": []})

    async def serve() -> tuple[TestServer, str]:
        app = web.Application()
        app.router.add_get("/v1/cluster", cluster)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        return server, str(server.make_url("")).rstrip("/")

    loop = asyncio.new_event_loop()
    server, url = loop.run_until_complete(serve())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        (tmp_path / "token").write_text("file-token\n")
        flag = invoke("status", "--peer", url, "--token", "argv-token")
        from_file = invoke(
            "status", "--peer", url, env={"MESH_API_TOKEN_FILE": str(tmp_path / "token")}
        )
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
    assert "--token is deprecated" in flag.stderr and "MESH_API_TOKEN_FILE" in flag.stderr
    assert "deprecated" not in from_file.stderr
    assert seen == ["Bearer argv-token", "Bearer file-token"], (flag.output, from_file.output)


def test_recover_refuses_what_is_not_a_surviving_voters_data_dir(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(main, ["recover", "--data-dir", str(empty), "--voters", "a:1"])
    assert result.exit_code == 1 and "not a voter's data dir" in result.output, result.output
    voter = tmp_path / "voter"
    voter.mkdir()
    (voter / "voters.json").write_text(json.dumps({"voters": ["a:1", "b:1", "c:1"]}))
    stranger = ["recover", "--data-dir", str(voter), "--voters", "a:1,z:9"]
    result = CliRunner().invoke(main, stranger)
    assert result.exit_code == 1 and "z:9 never was a voter" in result.output, result.output
    result = CliRunner().invoke(main, ["recover", "--data-dir", str(voter), "--voters", "a:1"])
    assert result.exit_code == 1 and "has no Raft journal" in result.output, result.output
    assert not (voter / "recovery.json").exists()


def test_up_refuses_an_open_api_on_a_non_loopback_address(started: list[Settings]) -> None:
    exposed = ("up", "--http", "0.0.0.0:8201", "--raft", "0.0.0.0:7101")
    result = invoke(*exposed, env={"MESH_SECRET": "s"})
    assert result.exit_code == 2 and "--api-tokens-file" in result.output, result.output
    assert started == []
    result = invoke(*exposed, "--insecure-no-auth", env={"MESH_SECRET": "s"})
    assert result.exit_code == 3, result.output
    assert started[0].insecure_no_auth


def test_client_commands_refuse_a_token_in_the_peer_url() -> None:
    result = invoke("status", "--peer", "http://user:secret-token@127.0.0.1:1")
    assert result.exit_code == 2 and "MESH_API_TOKEN_FILE" in result.output, result.output
