"""The executor Deployment's lifecycle (deploy/k8s/base/executors.yaml), played
with real processes: each executor starts with the container's own args
(`mesh join --executor ...`), takes runs, and is stopped with the pod's own
preStop command (`mesh leave --release ...`), under a steady stream of runs.
Nothing may be lost and no step may run twice.

The manifest is read, not copied: what runs here is what the pod runs, with
the kubelet's $(VAR) expansion and the client Service mapped to a voter.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from probe_agents import read_witness
from support import eventually, wait_all_terminal
from test_membership import Stream, assert_each_step_ran_once, member, membership_env

from raftmesh.mesh.client import MeshClient
from raftmesh.mesh.devmesh import DevMesh

pytestmark = pytest.mark.slow

MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "base" / "executors.yaml"
STEPS = 6
SECRET_MOUNT = "/run/secrets/raftmesh"


def _container() -> dict[str, Any]:
    deployment = yaml.safe_load(MANIFEST.read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


def _expand(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], value)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Pod:
    """One executor pod: its container process and its preStop hook."""

    def __init__(self, name: str, mesh: DevMesh, workdir: Path) -> None:
        container = _container()
        self.name = name
        self.http = f"127.0.0.1:{_free_port()}"
        ip = self.http.rsplit(":", 1)[0]
        fields = {"metadata.name": name, "status.podIP": ip}
        # The Secret: its storage URL, and its files where the pod mounts them.
        secret_dir = workdir / f"{name}-secret"
        secret_dir.mkdir()
        (secret_dir / "cluster_secret").write_text(mesh.secret_file.read_text())
        (secret_dir / "api_token").write_text(f"token-of-{name}\n")
        # The tokens file of the Secret: one tenant token beside the admin token.
        tenant_digest = hashlib.sha256(b"tenant-token").hexdigest()
        (secret_dir / "api_tokens.toml").write_text(
            f'[[token]]\nsha256 = "{tenant_digest}"\ntenant = "acme"\nadmin = false\n'
        )
        secret_keys = {"storage_url": mesh.storage}
        env: dict[str, str] = {}
        for entry in container["env"]:
            source = entry.get("valueFrom")
            if source is None:
                value = _expand(entry["value"], env)
                if value.startswith(SECRET_MOUNT + "/"):
                    value = str(secret_dir / Path(value).name)
                env[entry["name"]] = value
            elif "fieldRef" in source:
                env[entry["name"]] = fields[source["fieldRef"]["fieldPath"]]
            else:
                env[entry["name"]] = secret_keys[source["secretKeyRef"]["key"]]
        # The pod IP's port is the container port; here each pod needs its own.
        env["MESH_PEER_URL"] = f"http://{self.http}"
        env.update(
            {
                # What the image sets.
                "MESH_DATA_DIR": str(workdir / name),
                # Two slots, not the manifest's eight: enough to take runs
                # from the stream, few enough that a leave interrupts some.
                "MESH_SLOTS": "2",
                **membership_env(),
            }
        )
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
        seed = mesh.url(mesh.peers[0].id)
        self.args = [
            seed if a == "http://raftmesh:8001" else _expand(a, {**env, "POD_IP": ip})
            for a in container["args"]
        ]
        self.args[self.args.index("--http") + 1] = self.http
        self.pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
        self.log_path = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.args[:2] == ["join", "--executor"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "raftmesh.cli", *self.args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    async def ready(self) -> None:
        async with MeshClient(f"http://{self.http}", timeout_s=2) as client:

            async def check() -> bool:
                assert self.process is not None and self.process.poll() is None, (
                    self.log_path.read_text()
                )
                return await client.readyz()

            await eventually(check, 60, f"{self.name} to be ready")

    async def stop(self) -> tuple[int, str, str]:
        """The kubelet's order: the preStop hook, then SIGTERM, then SIGKILL."""
        assert self.pre_stop[0] == "mesh"
        hook = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "raftmesh.cli",
            *self.pre_stop[1:],
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(hook.communicate(), 90)
        assert self.process is not None
        try:
            code = await asyncio.to_thread(self.process.wait, 15)
        except subprocess.TimeoutExpired:
            self.process.terminate()
            code = await asyncio.to_thread(self.process.wait, 35)
        assert hook.returncode is not None
        return hook.returncode, out.decode() + err.decode(), f"container exited {code}"

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


async def test_executor_pods_join_take_runs_and_leave_in_prestop_losing_nothing(
    make_mesh, tmp_path
):
    mesh = await make_mesh("postgres", slots=1, env=membership_env())
    witness = tmp_path / "witness"
    pods = [Pod(f"raftmesh-executor-{i}", mesh, tmp_path) for i in (1, 2)]
    probe = MeshClient(mesh.url("peer-1"), timeout_s=10)
    try:
        async with Stream(mesh, witness, steps=STEPS) as stream:
            for pod in pods:
                pod.start()
            await asyncio.gather(*(pod.ready() for pod in pods))

            async def finished_one_and_busy(pod_id: str) -> bool:
                """The pod took runs: it finished one and is in the middle of others."""
                started = {r for r, _, p, _, _ in read_witness(str(witness)) if p == pod_id}
                runs = [await probe.get_run(i) for i in started]
                mine = [r for r in runs if r["owner"] == pod_id]
                statuses = {r["status"] for r in mine}
                return {"succeeded", "running"} <= statuses

            first = pods[0]
            await eventually(lambda: finished_one_and_busy(first.name), 60, "runs on pod 1")
            code, output, exited = await first.stop()
            assert code == 0, output
            assert f"{first.name} left the mesh" in output and exited == "container exited 0"
            info = await probe.cluster()
            assert member(info, first.name)["status"] == "left"
            assert member(info, first.name)["running"] == 0

            second = pods[1]
            await eventually(lambda: finished_one_and_busy(second.name), 60, "runs on pod 2")
        code, output, exited = await second.stop()
        assert code == 0 and exited == "container exited 0", output

        runs = await wait_all_terminal(probe, stream.ids, timeout_s=120)
        assert_each_step_ran_once(witness, runs, STEPS)
        owners = {r["owner"] for r in runs.values()}
        assert {p.name for p in pods} <= owners, "both executors finished runs"
        released = [
            r
            for r in runs.values()
            if r["result"]["steps"][0]["peer"] == first.name and r["owner"] != first.name
        ]
        assert released, "runs running on pod 1 at its preStop went back and finished elsewhere"
        for run in released:
            assert run["epoch"] >= 2
        info = await probe.cluster()
        assert {member(info, p.name)["status"] for p in pods} == {"left"}
        assert sorted(info["voters"]) == sorted(p.raft for p in mesh.peers), "executors never vote"
        print(
            f"\n{len(runs)} runs, all succeeded, no step twice; {len(released)} released "
            f"by {first.name}'s preStop and finished elsewhere"
        )
    finally:
        for pod in pods:
            pod.kill()
        await probe.close()
