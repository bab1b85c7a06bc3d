"""``mesh join``, ``mesh leave``, ``mesh drain``, ``mesh undrain``.

Scriptable: one line of outcome on stdout (JSON with --json), errors as one
line on stderr with exit status 1, usage errors with 2.
"""

from __future__ import annotations

import json
import os
import tomllib
from typing import Any

import click

from raftmesh.cli.peer_options import peer_settings_options
from raftmesh.cli.remote import call, peer_option, token_option
from raftmesh.consensus.voters import persisted_voters
from raftmesh.mesh.client import MeshClient
from raftmesh.mesh.membership import mark_learner
from raftmesh.mesh.settings import Settings, SettingsError

json_option = click.option("--json", "as_json", is_flag=True, help="Print the answer as JSON.")


def _print(answer: dict[str, Any], as_json: bool, line: str) -> None:
    click.echo(json.dumps(answer) if as_json else line)


@click.command()
@click.argument("seed_url")
@click.option(
    "--id", "id_", required=True, envvar="MESH_ID", help="The new peer's id; must not be in use."
)
@click.option("--raft", help="Raft bind address HOST:PORT (voters only).")
@click.option("--http", required=True, envvar="MESH_HTTP", help="HTTP API bind address HOST:PORT.")
@click.option(
    "--executor", is_flag=True, help="Join as a non-voting executor (runs work, no vote)."
)
@peer_settings_options
@click.option(
    "--config", type=click.Path(dir_okay=False), envvar="MESH_CONFIG", help="TOML settings file."
)
def join(seed_url: str, id_: str, executor: bool, config: str | None, **flags: Any) -> None:
    """Join the mesh that SEED_URL (any peer's API) belongs to, then run this peer.

    The peer is admitted first (its id reserved); a voter then starts as a
    learner that receives the log without voting and is made a voter once it
    has caught up (it exits 1 if that does not happen within join_timeout_s).
    Started again from the same --data-dir, it comes back as the same member
    (use `mesh up` or this).
    """
    role = "executor" if executor else "voter"
    try:
        settings = Settings.load({**flags, "id": id_, "role": role}, config)
        settings.check_secret()
        settings.check_auth()
    except (SettingsError, OSError, tomllib.TOMLDecodeError) as exc:
        raise click.UsageError(str(exc)) from exc
    if role == "voter" and not flags.get("raft") and not os.environ.get("MESH_RAFT"):
        raise click.UsageError("a voter needs --raft HOST:PORT (or join with --executor)")
    try:
        known = persisted_voters(settings.data_dir)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    if known is None:
        raft = settings.raft if role == "voter" else None
        token = settings.api_token or None
        answer = call(seed_url, token, lambda c: c.join(settings.id, settings.http, raft, role), 60)
        known = list(answer["voters"])
        if answer.get("learner"):
            mark_learner(settings.data_dir)
        stage = "learner until caught up" if answer.get("learner") else role
        click.echo(f"joined as {stage} {settings.id}; voters: {', '.join(known)}", err=True)
    else:
        click.echo(f"{settings.data_dir} is already a member: starting it", err=True)
    partners = tuple(v for v in known if v != settings.raft or role == "executor")
    settings = Settings.load(
        {**flags, "id": id_, "role": role, "peers": ",".join(partners)}, config
    )
    from raftmesh.mesh.peer import run

    raise SystemExit(run(settings))


@click.command()
@click.argument("peer_id", required=False)
@peer_option
@token_option
@click.option(
    "--release", is_flag=True, help="Hand running runs back at their next step instead of waiting."
)
@click.option(
    "--timeout",
    type=float,
    default=120.0,
    show_default=True,
    help="Seconds to wait for the answer.",
)
@json_option
def leave(
    peer_id: str | None, peer: str, token: str | None, release: bool, timeout: float, as_json: bool
) -> None:
    """Drain a peer and remove it from the mesh (default: the peer at --peer).

    A peer that is up is asked to leave itself, so its runs drain first; a
    peer that is down is removed through --peer. The peer process exits 0.
    """

    async def go(client: MeshClient) -> dict[str, Any]:
        cluster = await client.cluster()
        target = peer_id or cluster["self"]
        member = next((p for p in cluster["peers"] if p["id"] == target), None)
        if member is None or target == cluster["self"] or member["status"] != "up":
            return await client.leave(target, release)
        async with client.sibling(member["http"], timeout) as own:
            return await own.leave(target, release)

    answer = call(peer, token, go, timeout)
    _print(answer, as_json, f"{answer['id']} left the mesh ({answer['requeued']} runs requeued)")


@click.command()
@click.argument("peer_id")
@peer_option
@token_option
@click.option("--release", is_flag=True, help="Hand its running runs back at their next step.")
@json_option
def drain(peer_id: str, peer: str, token: str | None, release: bool, as_json: bool) -> None:
    """Assign nothing new to PEER_ID; its runs finish there (or, with --release, move)."""
    answer = call(peer, token, lambda c: c.drain(peer_id, release), 30)
    _print(
        answer, as_json, f"{peer_id} draining ({answer['drain']}); {answer['running']} runs there"
    )


@click.command()
@click.argument("peer_id")
@peer_option
@token_option
@json_option
def undrain(peer_id: str, peer: str, token: str | None, as_json: bool) -> None:
    """Let PEER_ID take runs again."""
    answer = call(peer, token, lambda c: c.undrain(peer_id), 30)
    _print(answer, as_json, f"{peer_id} takes runs again")


@click.command()
@click.option(
    "--data-dir",
    required=True,
    type=click.Path(file_okay=False, exists=True),
    help="The data dir of a surviving voter (its peer stopped).",
)
@click.option(
    "--voters",
    required=True,
    help="Raft addresses HOST:PORT of every surviving voter, comma-separated (the same on each).",
)
@json_option
def recover(data_dir: str, voters: str, as_json: bool) -> None:
    """Rebuild a mesh that lost its majority for good from its surviving voters.

    Run it on the data dir of every surviving voter, with the same --voters,
    while those peers are stopped; then start them as before. They form a mesh
    of exactly these voters; of their logs the most up-to-date one wins, so
    nothing any survivor holds is lost. The lost voters must never start again
    from their old data dirs. See README, "Recovering a mesh that lost its
    majority".
    """
    # Here, not at the top: it reads the Raft journal through pysyncobj, which
    # no other client command loads.
    from raftmesh.consensus.raft import recover_data_dir

    addrs = [v.strip() for v in voters.split(",") if v.strip()]
    try:
        answer = recover_data_dir(data_dir, addrs)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    _print(
        answer,
        as_json,
        f"{data_dir}: voters pinned to {', '.join(answer['voters'])} for its next start; "
        f"log ends at term {answer['last_term']} index {answer['last_index']}; "
        f"lost for good: {', '.join(answer['lost']) or 'none'}",
    )


COMMANDS = [join, leave, drain, undrain, recover]
