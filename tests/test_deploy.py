"""The files in deploy/ describe peers that Settings accepts, so they cannot rot silently.

No Docker engine or Kubernetes cluster runs here, so each file is checked the
way its tool would read it: the Dockerfile parsed (dockerfile-parse), the
compose files against the compose specification's JSON schema (vendored in
check-jsonschema), every Kubernetes manifest against the Kubernetes schemas
that kubernetes-validate ships, and KEDA's ScaledObject against KEDA's own
CRD schema (vendored in tests/schemas/). Then what the files mean is checked
against the code: variable names against Settings, metric names against
mesh/metrics.py, alerts against docs/operations.md. The image's two scripts
run for real.
"""

from __future__ import annotations

import copy
import http.server
import importlib.resources
import json
import os
import re
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from raftmesh.mesh.metrics import Metrics
from raftmesh.mesh.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose"
OBSERVABILITY = DEPLOY / "observability"
KUBERNETES_VERSION = "1.37.0"
KEDA_CRD = Path(__file__).resolve().parent / "schemas" / "keda.sh_scaledobjects.yaml"

SETTINGS_ENV = {f"MESH_{f.upper()}" for f in Settings.__dataclass_fields__}
# Read by the mesh command itself or by the chat agent rather than by Settings.
CLI_ENV = {
    "MESH_PEER_URL",
    "MESH_CONFIG",
    "MESH_CHAT_API_KEY",
    "MESH_CHAT_BASE_URL",
    "MESH_CHAT_MODEL",
}


def test_example_toml_loads_with_every_key_known():
    settings = Settings.load({"secret": "s"}, str(DEPLOY / "raftmesh.example.toml"))
    assert settings.peers == ("10.0.0.12:7001", "10.0.0.13:7001")
    assert settings.labels == {"pool": "cpu"}
    assert settings.storage.startswith("postgresql://")
    assert settings.secret == "s"
    settings.check_secret()
    assert settings.tenant_caps == {"free": 2, "pro": 10} and settings.default_tenant_cap == 4
    assert settings.replicated_policy()["tenant_max_queued"] == {"free": 100}
    assert sorted(settings.models) == ["default", "hosted"]
    assert settings.models["hosted"].api_key_env == "OPENAI_API_KEY"


def test_example_toml_without_secret_is_refused_on_real_addresses():
    settings = Settings.load({}, str(DEPLOY / "raftmesh.example.toml"))
    with pytest.raises(ValueError, match="MESH_SECRET"):
        settings.check_secret()


def mesh_env_names(text: str) -> set[str]:
    return {f"MESH_{name}" for name in re.findall(r"\bMESH_([A-Z_]+)\b", text)}


def deploy_files() -> list[Path]:
    return sorted(
        p
        for p in DEPLOY.rglob("*")
        if p.is_file() and p.suffix != ".json" and "secrets" not in p.parts
    )


@pytest.mark.parametrize("path", deploy_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_environment_variables_name_real_settings(path):
    used = mesh_env_names(path.read_text())
    unknown = used - SETTINGS_ENV - CLI_ENV
    assert not unknown, f"{path.name} sets unknown variables: {sorted(unknown)}"


def test_every_kind_of_deploy_file_configures_peers_through_mesh_variables():
    for name in (
        "Dockerfile",
        "systemd/raftmesh.env",
        "compose/all-in-one.yml",
        "k8s/base/voters.yaml",
    ):
        assert mesh_env_names((DEPLOY / name).read_text()), name


# --- the image --------------------------------------------------------------


@pytest.fixture(scope="module")
def dockerfile() -> DockerfileParser:
    return DockerfileParser(path=str(DEPLOY / "Dockerfile"))


def stages(parser: DockerfileParser) -> list[list[dict[str, Any]]]:
    out: list[list[dict[str, Any]]] = []
    for instruction in parser.structure:
        if instruction["instruction"] == "FROM":
            out.append([])
        if out and instruction["instruction"] != "COMMENT":
            out[-1].append(instruction)
    return out


def instructions(stage: list[dict[str, Any]], name: str) -> list[str]:
    return [i["value"] for i in stage if i["instruction"] == name]


def test_dockerfile_is_multi_stage_and_runs_as_a_fixed_unprivileged_user(dockerfile):
    built = stages(dockerfile)
    assert len(built) >= 2, "a build stage and a runtime stage"
    runtime = built[-1]
    assert any("--from=build" in v for v in instructions(runtime, "COPY"))
    assert not instructions(runtime, "RUN")[1:], "the runtime stage only adds the user"
    (user,) = instructions(runtime, "USER")
    uid = user.split(":")[0]
    assert uid not in ("root", "0") and uid.isdigit() and int(uid) >= 1000, user
    useradd = instructions(runtime, "RUN")[0]
    assert f"--uid {uid}" in useradd
    assert [i["instruction"] for i in runtime].index("USER") > [
        i["instruction"] for i in runtime
    ].index("RUN"), "USER comes after the RUN that creates it"


def test_dockerfile_healthcheck_probes_healthz(dockerfile):
    runtime = stages(dockerfile)[-1]
    (check,) = instructions(runtime, "HEALTHCHECK")
    assert "CMD" in check and "raftmesh-healthcheck" in check
    assert "/healthz" in (DEPLOY / "image" / "healthcheck.py").read_text()


def test_dockerfile_data_dir_is_a_volume(dockerfile):
    env = dockerfile.envs
    volumes = [
        v for value in instructions(stages(dockerfile)[-1], "VOLUME") for v in json.loads(value)
    ]
    assert env["MESH_DATA_DIR"] in volumes
    assert Settings.load({"data_dir": env["MESH_DATA_DIR"]}).data_dir == "/var/lib/raftmesh"


def test_dockerfile_copies_every_package_and_file_it_names(dockerfile):
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]
    top_level = {p.split(".")[1] for p in packages}
    copied: set[str] = set()
    for value in instructions(stages(dockerfile)[0], "COPY") + instructions(
        stages(dockerfile)[-1], "COPY"
    ):
        if value.startswith("--from"):
            continue
        *sources, _dest = value.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
            copied.add(source)
    assert top_level <= copied, f"packages not copied into the image: {top_level - copied}"
    entrypoint = json.loads(instructions(stages(dockerfile)[-1], "ENTRYPOINT")[0])
    assert entrypoint == ["/usr/local/bin/raftmesh-entrypoint"]
    assert os.access(DEPLOY / "image" / "entrypoint.sh", os.X_OK)


class _Healthz(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200 if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def healthz_server() -> Iterator[str]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Healthz)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_healthcheck_script_answers_for_the_advertised_address(healthz_server):
    script = str(DEPLOY / "image" / "healthcheck.py")
    ok = subprocess.run([sys.executable, script], env={"MESH_HTTP": healthz_server}, timeout=10)
    assert ok.returncode == 0
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{sock.getsockname()[1]}"
    down = subprocess.run(
        [sys.executable, script], env={"MESH_HTTP": closed}, capture_output=True, timeout=10
    )
    assert down.returncode == 1 and b"healthz on" in down.stderr


def test_entrypoint_turns_secret_files_into_variables_and_runs_mesh(tmp_path):
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "MESH_SECRET").write_text("from-a-file\n")
    (secrets / "MESH_STORAGE").write_text("postgresql://u:p@db/raftmesh")
    (secrets / "MESH_API_TOKEN").write_text("not-this-one")
    (secrets / "unrelated").write_text("ignored")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "mesh"
    fake.write_text('#!/bin/sh\necho "args=$*"\nenv | grep ^MESH_ | sort\n')
    fake.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "RAFTMESH_SECRETS_DIR": str(secrets),
        "MESH_STORAGE": "set-explicitly-wins",
        "MESH_API_TOKEN_FILE": "/run/secrets/api_token",
    }
    out = subprocess.run(
        ["sh", str(DEPLOY / "image" / "entrypoint.sh"), "join", "--executor", "http://seed:8001"],
        env=env,
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout.splitlines()
    assert out[0] == "args=join --executor http://seed:8001"
    got = dict(line.split("=", 1) for line in out[1:])
    assert got["MESH_SECRET"] == "from-a-file"
    assert got["MESH_STORAGE"] == "set-explicitly-wins"
    assert "MESH_API_TOKEN" not in got, "its own _FILE setting reads it; both would be refused"
    assert got["MESH_ID"] == socket.gethostname()
    assert got["MESH_HTTP"].endswith(":8001") and not got["MESH_HTTP"].startswith("0.0.0.0")


# --- compose ----------------------------------------------------------------


@pytest.fixture(scope="module")
def compose_schema() -> dict[str, Any]:
    ref = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    return dict(json.loads(ref.read_text()))


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("name", ["all-in-one.yml", "executors.yml"])
def test_compose_files_follow_the_compose_specification(name, compose_schema):
    validator = jsonschema.Draft202012Validator(compose_schema)
    errors = sorted(validator.iter_errors(load_yaml(COMPOSE / name)), key=str)
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_compose_schema_catches_a_misspelled_key(compose_schema):
    broken = copy.deepcopy(load_yaml(COMPOSE / "all-in-one.yml"))
    broken["services"]["peer-1"]["enviroment"] = {"MESH_ID": "x"}
    assert list(jsonschema.Draft202012Validator(compose_schema).iter_errors(broken))


def peer_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if n.startswith("peer-")}


def secret_files_in(env: dict[str, str], mount: str, root: Path) -> dict[str, str]:
    """``env`` with every path under ``mount`` moved to a file under ``root``
    holding a stand-in secret, as the container would find it."""
    out = dict(env)
    for name, value in env.items():
        if value.startswith(mount + "/"):
            path = root / Path(value).name
            path.write_text(f"stand-in {Path(value).name}\n")
            out[name] = str(path)
    return out


def settings_from_env(env: dict[str, str]) -> Settings:
    """What a peer started with ``env`` (its MESH_* variables) would run with."""
    mesh = {k: v for k, v in env.items() if k in SETTINGS_ENV}
    return Settings.load({k.removeprefix("MESH_").lower(): v for k, v in mesh.items()})


def test_compose_voters_each_have_a_volume_and_settings_that_load(tmp_path):
    compose = load_yaml(COMPOSE / "all-in-one.yml")
    peers = peer_services(compose)
    assert len(peers) == 3
    assert {"postgres", "prometheus", "grafana", "otel-collector"} <= set(compose["services"])
    data_volumes = [s["volumes"][0].split(":") for s in peers.values()]
    assert len({source for source, _ in data_volumes}) == 3, "one volume per peer"
    assert all(target == "/var/lib/raftmesh" for _, target in data_volumes)
    assert all(source in compose["volumes"] for source, _ in data_volumes)
    for name, service in peers.items():
        env = secret_files_in(service["environment"], "/run/secrets", tmp_path)
        # What the entrypoint adds from /run/secrets/MESH_STORAGE.
        env["MESH_STORAGE"] = "postgresql://raftmesh:pw@postgres:5432/raftmesh"
        settings = settings_from_env(env)
        assert settings.id == name and settings.raft == f"{name}:7001"
        assert settings.http == f"{name}:8001", "advertise a reachable address, not 0.0.0.0"
        assert len(settings.peers) == 3 and settings.raft in settings.peers
        assert settings.secret == "stand-in cluster_secret"
        assert settings.api_token == "stand-in api_token"
        settings.check_secret()


def mounted_secrets(service: dict[str, Any]) -> dict[str, str]:
    """Secret name -> the file it appears as under /run/secrets."""
    out = {}
    for entry in service.get("secrets", []):
        if isinstance(entry, str):
            out[entry] = entry
        else:
            out[entry["source"]] = entry.get("target", entry["source"])
    return out


def test_compose_secrets_come_from_files_never_from_the_environment():
    compose = load_yaml(COMPOSE / "all-in-one.yml")
    executors = load_yaml(COMPOSE / "executors.yml")
    secret_env = {"MESH_SECRET", "MESH_API_TOKEN", "MESH_STORAGE"}
    make_secrets = (COMPOSE / "make-secrets.sh").read_text()
    for declared in compose["secrets"].values():
        assert Path(declared["file"]).name in make_secrets, declared
    services = {**compose["services"], **executors["services"]}
    for name, service in services.items():
        env = service.get("environment", {})
        assert not secret_env & set(env), f"{name} has a secret in its environment"
        assert not [k for k in env if "PASSWORD" in k and not k.endswith("FILE")], name
        mounted = mounted_secrets(service)
        files = {f"/run/secrets/{target}" for target in mounted.values()}
        for key, value in env.items():
            if key.endswith("_FILE"):
                assert value in files, f"{name}: {key} names {value}, which is not mounted"
        if name.startswith("peer-") or name == "executor":
            assert set(mounted) <= set(compose["secrets"]), name
            assert mounted["storage_url"] == "MESH_STORAGE", "the entrypoint's name for it"
            assert {"MESH_SECRET_FILE", "MESH_API_TOKEN_FILE"} <= set(env), name


def test_compose_executors_join_the_mesh_as_executors():
    compose = load_yaml(COMPOSE / "all-in-one.yml")
    (executor,) = load_yaml(COMPOSE / "executors.yml")["services"].values()
    command = executor["command"]
    assert command[:2] == ["join", "--executor"]
    seed = command[2].removeprefix("http://").split(":")[0]
    assert seed in peer_services(compose)
    assert set(executor["networks"]) <= set(compose["networks"])
    assert "MESH_ID" not in executor["environment"], "scaled copies need ids of their own"


def test_compose_mounts_files_that_exist():
    compose = load_yaml(COMPOSE / "all-in-one.yml")
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE / source).exists(), source


# --- metrics named in alerts, dashboards and autoscalers exist --------------


METRICS = {m.name for m in Metrics().registry.collect()}
METRIC_NAME = re.compile(r"\braftmesh_[a-z_]+\b")


def known_metric(name: str) -> bool:
    for suffix in ("_bucket", "_count", "_sum", "_total"):
        if name.endswith(suffix) and name.removesuffix(suffix) in METRICS:
            return True
    return name in METRICS


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in load_yaml(OBSERVABILITY / "alerts.yml")["groups"] for r in g["rules"]]


def test_alerts_use_real_metrics_and_are_explained_in_the_operations_guide():
    operations = (ROOT / "docs" / "operations.md").read_text()
    rules = alert_rules()
    assert len(rules) >= 6
    for rule in rules:
        assert set(rule) >= {"alert", "expr", "labels", "annotations"}, rule
        names = METRIC_NAME.findall(rule["expr"])
        assert all(known_metric(n) for n in names), (rule["alert"], names)
        assert re.search(rf"^#+ .*`{rule['alert']}`", operations, re.M), (
            f"docs/operations.md has no section for {rule['alert']}"
        )


def test_dashboard_prometheus_and_collector_configs_read_real_metrics():
    dashboard = json.loads((OBSERVABILITY / "grafana" / "dashboards" / "raftmesh.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            names = METRIC_NAME.findall(target["expr"])
            assert names and all(known_metric(n) for n in names), target
    prometheus = load_yaml(OBSERVABILITY / "prometheus.yml")
    assert prometheus["rule_files"] == ["/etc/prometheus/alerts.yml"]
    peers = set(peer_services(load_yaml(COMPOSE / "all-in-one.yml")))
    targets = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    assert {t.split(":")[0] for t in targets} == peers
    collector = load_yaml(OBSERVABILITY / "otel-collector.yml")
    for pipeline in collector["service"]["pipelines"].values():
        assert set(pipeline["receivers"]) <= set(collector["receivers"])
        assert set(pipeline["exporters"]) <= set(collector["exporters"])


# --- Kubernetes -------------------------------------------------------------


def manifests() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                docs.append((f"{path.relative_to(K8S)}#{i}", doc))
    return docs


MANIFESTS = manifests()


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in MANIFESTS if doc["kind"] == kind]


def one(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in by_kind(kind) if d["metadata"]["name"] == name]
    return doc


@pytest.mark.parametrize(
    "where,doc",
    [(w, d) for w, d in MANIFESTS if d["apiVersion"] != "keda.sh/v1alpha1"],
    ids=[w for w, d in MANIFESTS if d["apiVersion"] != "keda.sh/v1alpha1"],
)
def test_manifest_validates_against_the_kubernetes_schema(where, doc):
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_kubernetes_validation_catches_a_misspelled_field():
    broken = copy.deepcopy(one("StatefulSet", "raftmesh-voter"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def strict(schema: Any) -> Any:
    """The CRD's schema with unknown fields refused, as the API server's strict
    field validation refuses them (pruning would drop them silently)."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def scaled_object_validator() -> jsonschema.Validator:
    crd = load_yaml(KEDA_CRD)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    schema = strict(version["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def test_scaled_object_validates_against_kedas_crd(scaled_object_validator):
    (scaled,) = by_kind("ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    errors = list(scaled_object_validator.iter_errors(scaled))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]
    broken = copy.deepcopy(scaled)
    broken["spec"]["minReplicaCont"] = 1
    assert list(scaled_object_validator.iter_errors(broken))


def substitute(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], value)


def container_env(
    pod: dict[str, Any], fields: dict[str, str], secrets: dict[str, str] | None = None
) -> dict[str, str]:
    """The container's variables with $(VAR) expanded, as the kubelet does;
    ``secrets`` stands in for the Secret's keys."""
    env: dict[str, str] = {}
    for entry in pod["containers"][0]["env"]:
        source = entry.get("valueFrom")
        if source is None:
            env[entry["name"]] = substitute(entry["value"], env)
        elif "fieldRef" in source:
            env[entry["name"]] = fields[source["fieldRef"]["fieldPath"]]
        else:
            env[entry["name"]] = (secrets or {})[source["secretKeyRef"]["key"]]
    return env


def secret_keys() -> set[str]:
    (generator,) = load_yaml(K8S / "base" / "kustomization.yaml")["secretGenerator"]
    return {Path(f.split("=")[-1]).name for f in generator["files"]}


def secret_mount(pod: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Where the raftmesh Secret is mounted, and its volume."""
    (volume,) = [v for v in pod["volumes"] if "secret" in v]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
    return mount["mountPath"], volume


STAND_IN_SECRETS = {"storage_url": "postgresql://raftmesh:pw@db.example:5432/raftmesh"}


def test_voters_are_a_statefulset_with_stable_raft_addresses(tmp_path):
    sts = one("StatefulSet", "raftmesh-voter")
    headless = one("Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"]
    assert sts["spec"]["replicas"] == 3
    assert sts["spec"]["podManagementPolicy"] == "Parallel", "a lone voter is never ready"
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    pod = sts["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == "/var/lib/raftmesh"
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert headless["spec"]["selector"].items() <= labels.items()
    voters = [f"{sts['metadata']['name']}-{i}" for i in range(3)]
    mount, _ = secret_mount(pod)
    for name in voters:
        fields = {"metadata.name": name, "status.podIP": "10.1.2.3"}
        env = container_env(pod, fields, STAND_IN_SECRETS)
        settings = settings_from_env(secret_files_in(env, mount, tmp_path))
        assert settings.id == name
        assert settings.raft == f"{name}.{headless['metadata']['name']}:7001"
        assert sorted(settings.peers) == sorted(
            f"{v}.{headless['metadata']['name']}:7001" for v in voters
        )
        assert settings.http == "10.1.2.3:8001"
        assert settings.secret == "stand-in cluster_secret"
        assert settings.storage == STAND_IN_SECRETS["storage_url"]
        settings.check_secret()


def pod_specs() -> dict[str, dict[str, Any]]:
    return {
        d["metadata"]["name"]: d["spec"]["template"]["spec"]
        for d in by_kind("StatefulSet") + by_kind("Deployment")
    }


@pytest.mark.parametrize("name", ["raftmesh-voter", "raftmesh-executor"])
def test_peers_have_probes_resources_and_no_privileges(name):
    pod = pod_specs()[name]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for kind in ("requests", "limits"):
        assert set(container["resources"][kind]) == {"cpu", "memory"}, kind
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    mount, volume = secret_mount(pod)
    assert volume["secret"]["secretName"] == "raftmesh"
    assert {i["key"] for i in volume["secret"]["items"]} <= secret_keys()
    assert [m for m in container["volumeMounts"] if m["mountPath"] == mount][0]["readOnly"]
    env = {e["name"]: e for e in container["env"]}
    for name in ("MESH_SECRET_FILE", "MESH_API_TOKEN_FILE"):
        assert Path(env[name]["value"]).parent == Path(mount), name
    storage = env["MESH_STORAGE"]["valueFrom"]["secretKeyRef"]
    assert storage == {"name": "raftmesh", "key": "storage_url"}
    assert not {"MESH_SECRET", "MESH_API_TOKEN"} & set(env), "secrets come from files"
    assert pod["terminationGracePeriodSeconds"] > 30, "longer than MESH_SHUTDOWN_GRACE_S"


def test_executors_join_at_start_and_leave_in_prestop():
    (container,) = pod_specs()["raftmesh-executor"]["containers"]
    args = container["args"]
    assert args[:2] == ["join", "--executor"]
    seed = args[2].removeprefix("http://").split(":")[0]
    assert one("Service", seed)["spec"]["selector"] == {"app.kubernetes.io/name": "raftmesh"}
    assert args[args.index("--id") + 1] == "$(POD_NAME)"
    assert args[args.index("--http") + 1] == "$(POD_IP):8001"
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[:3] == ["mesh", "leave", "--release"]
    leave_timeout = float(pre_stop[pre_stop.index("--timeout") + 1])
    grace = pod_specs()["raftmesh-executor"]["terminationGracePeriodSeconds"]
    assert leave_timeout < grace
    env = container_env(
        pod_specs()["raftmesh-executor"],
        {"metadata.name": "x", "status.podIP": "10.9.8.7"},
        STAND_IN_SECRETS,
    )
    assert env["MESH_PEER_URL"] == "http://10.9.8.7:8001", "mesh leave asks this very pod"


def test_disruption_budget_allows_one_voter_at_a_time():
    (pdb,) = by_kind("PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    voter_labels = one("StatefulSet", "raftmesh-voter")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"] == voter_labels


def test_network_policy_keeps_raft_between_peers():
    policies = {p["metadata"]["name"]: p["spec"] for p in by_kind("NetworkPolicy")}
    raft_ports = {
        port["port"]
        for spec in policies.values()
        for rule in spec["ingress"]
        for port in rule["ports"]
    }
    assert raft_ports == {7001, 8001}
    for spec in policies.values():
        for rule in spec["ingress"]:
            if any(p["port"] == 7001 for p in rule["ports"]):
                assert rule["from"] == [
                    {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "raftmesh"}}}
                ], "Raft only from peers"
    http = policies["raftmesh-http"]["ingress"][0]["from"]
    assert {"namespaceSelector": {"matchLabels": {"raftmesh.io/client": "true"}}} in http


def test_autoscalers_scale_executors_on_the_queue_with_a_floor_of_one():
    executor = one("Deployment", "raftmesh-executor")
    (scaled,) = by_kind("ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == executor["metadata"]["name"]
    assert scaled["spec"]["minReplicaCount"] == 1
    queries = [t["metadata"]["query"] for t in scaled["spec"]["triggers"]]
    assert {n for q in queries for n in METRIC_NAME.findall(q)} == {
        "raftmesh_queue_depth",
        "raftmesh_queue_oldest_age_seconds",
    }
    (hpa,) = by_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == executor["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] == 1
    metrics = {m["external"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    assert metrics == {"raftmesh_queue_depth", "raftmesh_queue_oldest_age_seconds"}
    assert all(known_metric(m) for m in metrics)


def test_secret_holds_exactly_what_the_peers_read():
    assert secret_keys() == {"cluster_secret", "api_token", "api_tokens.toml", "storage_url"}
    (example,) = by_kind("Secret")
    assert set(example["stringData"]) == secret_keys()
    used = set()
    for pod in pod_specs().values():
        used |= {i["key"] for i in secret_mount(pod)[1]["secret"]["items"]}
        used |= {
            e["valueFrom"]["secretKeyRef"]["key"]
            for e in pod["containers"][0]["env"]
            if "secretKeyRef" in e.get("valueFrom", {})
        }
    assert used == secret_keys()


def test_kustomizations_list_files_that_exist_and_miss_none():
    base = load_yaml(K8S / "base" / "kustomization.yaml")
    listed = set(base["resources"])
    on_disk = {p.name for p in (K8S / "base").glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk - {"secret.example.yaml"}
    for overlay in ("keda", "hpa"):
        kustomization = load_yaml(K8S / overlay / "kustomization.yaml")
        assert "../base" in kustomization["resources"]
        for resource in kustomization["resources"]:
            assert (K8S / overlay / resource).exists(), (overlay, resource)
