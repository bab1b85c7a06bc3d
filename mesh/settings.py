"""Peer configuration: one frozen dataclass, from flags, MESH_* env and TOML.

Precedence: explicit flags, then environment, then the TOML file, then the
defaults, which work for one peer on one machine. A misspelled key is an error,
not silently ignored.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from raftmesh.consensus.spec import CONSISTENT_HASH, LEAST_LOADED, PLACEMENTS
from raftmesh.consensus.state import MAX_PREFETCH, SHORT_COMMAND_TTL_MS
from raftmesh.mesh.auth import TokensFileError, load_tokens
from raftmesh.runner.models import (
    DEFAULT_MODEL,
    ModelConfigError,
    ModelEndpoint,
    env_default_model,
    parse_models,
)
from raftmesh.runner.rate_limits import RateLimit, RateLimitConfigError, parse_rate_limits

# unsafe_disable_fencing is refused unless this environment variable holds
# exactly this value: a debug switch that corrupts runs must not be one typo
# away from production.
UNSAFE_FENCING_ACK_ENV = "MESH_UNSAFE_ACK"
UNSAFE_FENCING_ACK = "stale-writes-corrupt-runs"


class SettingsError(ValueError):
    """The configuration cannot describe a working peer."""


@dataclass(frozen=True)
class Settings:
    id: str = "peer-1"
    raft: str = "127.0.0.1:7001"
    http: str = "127.0.0.1:8001"
    peers: tuple[str, ...] = ()
    storage: str = "sqlite:///./raftmesh.db"
    data_dir: str = "./raftmesh-data"
    slots: int = 4
    # Runs a peer holds ready beyond its slots, so a freed slot starts the next
    # run at once instead of after a commit. Replicated: the leader's counts.
    # Off by default: a prefetched run waits for a slot of that peer even when
    # another peer's frees first, which costs long runs more than it saves.
    prefetch: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    # Secrets: from MESH_SECRET / MESH_API_TOKEN or, better, from the files
    # MESH_SECRET_FILE / MESH_API_TOKEN_FILE name (read by ``load``). The
    # --secret and --api-token flags still work, deprecated: argv shows in ps.
    secret: str = field(default="", repr=False)
    secret_file: str = ""
    api_token: str = field(default="", repr=False)
    api_token_file: str = ""
    # Tenant and admin tokens (mesh/auth.py): TOML [[token]] tables of sha256,
    # tenant, admin. ``api_token`` is one more admin token beside them.
    api_tokens_file: str = ""
    # A peer whose HTTP address is not loopback refuses to serve an open API
    # (no token of any kind) unless this says so.
    insecure_no_auth: bool = False
    # HTTPS for the API and the peers' internal calls: the peer's certificate
    # and key (PEM), and the CA that signs the peers' certificates, which
    # every peer verifies the others against.
    tls_cert: str = ""
    tls_key: str = ""
    ca: str = ""
    # Event streams (SSE) are held open for a run's life: at most this many
    # on one peer, and per token.
    max_streams: int = 1000
    max_streams_per_token: int = 100
    # Events one run may store; ctx.emit past it fails the step (see
    # runner/context.py), so a runaway loop cannot fill storage.
    max_events_per_run: int = 100_000
    max_body_bytes: int = 1024 * 1024
    # Five heartbeats to a TTL: a follower owner's runs resume within 2 s of
    # its death, and a loaded 2-core soak (mesh bench many-agents) marked no
    # live peer down.
    heartbeat_interval_s: float = 0.3
    peer_ttl_s: float = 1.5
    scheduler_tick_s: float = 0.2
    commit_timeout_s: float = 5.0
    agent_modules: tuple[str, ...] = ()
    # The demo agents (steps, fail, fanout, hog, ...): on in `mesh dev` and the
    # test meshes, off on a production peer.
    demo_agents: bool = False
    # Model endpoints the chat agent may call, by name ([models.NAME] tables,
    # MESH_MODELS as JSON, or MESH_CHAT_* as "default"); a run chooses a name.
    models: dict[str, ModelEndpoint] = field(default_factory=dict)
    # Limits of model providers, shared by every peer: leased out by the leader
    # with the heartbeat (mesh/rate_limits.py), spent with ctx.limit. A model
    # endpoint names its limit in ``rate_limit``.
    rate_limits: dict[str, RateLimit] = field(default_factory=dict)
    # A peer's share of those limits lasts this long unless its heartbeat
    # renews it; a dead peer's share goes to the others after it.
    rate_limit_lease_s: float = 2.0
    max_children: int = 16
    max_depth: int = 3
    # A run whose wait (ctx.sleep, a signal's timeout) is at least this long
    # leaves its slot and waits in the replicated state (runner/context.py);
    # waits for a signal without a timeout and for children always do.
    suspend_after_s: float = 5.0
    isolation_memory_mb: int = 512
    # Environment variables a process-isolated agent gets besides the minimal
    # set (PATH, HOME, locale, PYTHONPATH...): never the peer's secrets unless
    # named here (e.g. MESH_CHAT_API_KEY for the chat agent).
    isolation_env: tuple[str, ...] = ("MESH_CHAT_BASE_URL", "MESH_CHAT_MODEL")
    events_poll_s: float = 1.0
    log_level: str = "info"
    # auto: logfmt when stderr is a terminal, JSON lines otherwise.
    log_format: str = "auto"
    # Diagnostics warn when the oldest queued run waits half this, fail past it.
    queue_sla_s: float = 60.0
    # Scheduling policy. The leader replicates the caps, the retry policy and
    # the aging (``configure``) so apply can enforce them and hand a finished
    # run's slot on in the leader's order; placement is its own.
    placement: str = LEAST_LOADED
    priority_aging_s: float = 60.0
    tenant_caps: dict[str, int] = field(default_factory=dict)
    default_tenant_cap: int | None = None
    tenant_max_queued: dict[str, int] = field(default_factory=dict)
    # Backpressure by default: past this many queued runs a tenant's
    # submissions are answered 429 (None: no maximum).
    default_tenant_max_queued: int | None = 10_000
    retry_backoff_base_s: float = 1.0
    retry_backoff_max_s: float = 60.0
    retry_timeouts: bool = True
    count_lost_owner: bool = False
    # "voter": a Raft member; "executor": follows the log without voting.
    role: str = "voter"
    # SIGTERM: runs are released at their next step boundary (or finish)
    # within this time; what is left is then stopped and released anyway.
    shutdown_grace_s: float = 30.0
    # A join reservation whose peer has not connected, caught up and come up
    # within this time is removed by the leader (a made-up address never votes).
    join_timeout_s: float = 60.0
    # Advertised address (Raft or HTTP, of another peer) -> the address to
    # connect to instead: for peers reached through NAT or a proxy (the chaos
    # harness routes every link through its own proxy to cut it at will).
    dial: dict[str, str] = field(default_factory=dict)
    # UNSAFE debug switch: storage accepts writes from stale epochs and a
    # cut-off peer does not stop its runs. Exists only so the chaos checker can
    # be shown catching the stale writes that fencing prevents; refused unless
    # MESH_UNSAFE_ACK acknowledges it.
    unsafe_disable_fencing: bool = False

    def __post_init__(self) -> None:
        for name in ("raft", "http"):
            host, _, port = getattr(self, name).rpartition(":")
            if not host or not port.isdigit():
                raise SettingsError(f"--{name} must be HOST:PORT, got {getattr(self, name)!r}")
        if self.slots < 0:
            raise SettingsError("--slots must be >= 0")
        if not 0 <= self.prefetch <= MAX_PREFETCH:
            raise SettingsError(f"prefetch must be between 0 and {MAX_PREFETCH}")
        if self.max_children < 0 or self.max_depth < 0:
            raise SettingsError("max_children and max_depth must be >= 0")
        if self.isolation_memory_mb <= 0:
            raise SettingsError("isolation_memory_mb must be positive")
        if self.events_poll_s <= 0:
            raise SettingsError("events_poll_s must be positive")
        if not 0 <= self.suspend_after_s < 1e9:
            raise SettingsError("suspend_after_s must be a number of seconds >= 0")
        if self.role not in ("voter", "executor"):
            raise SettingsError(f"--role must be voter or executor, got {self.role!r}")
        if self.join_timeout_s <= 0:
            raise SettingsError("join_timeout_s must be positive")
        if self.shutdown_grace_s < 0:
            raise SettingsError("shutdown_grace_s must be >= 0")
        if min(self.max_streams, self.max_streams_per_token, self.max_events_per_run) < 1:
            raise SettingsError(
                "max_streams, max_streams_per_token, max_events_per_run must be >= 1"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise SettingsError("--tls-cert and --tls-key go together: give both or neither")
        if self.peer_ttl_s <= self.heartbeat_interval_s:
            raise SettingsError("peer_ttl_s must exceed heartbeat_interval_s")
        if self.placement not in PLACEMENTS:
            raise SettingsError(f"placement must be one of {', '.join(PLACEMENTS)}")
        limits: list[int | None] = [*self.tenant_caps.values(), *self.tenant_max_queued.values()]
        limits += [self.default_tenant_cap, self.default_tenant_max_queued]
        if any(v is not None and v < 0 for v in limits):
            raise SettingsError("tenant caps and queued maximums must be >= 0")
        if not 0 <= self.retry_backoff_base_s <= self.retry_backoff_max_s:
            raise SettingsError("need 0 <= retry_backoff_base_s <= retry_backoff_max_s")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise SettingsError(
                f"--log-level must be debug, info, warning, error or critical, got {self.log_level!r}"
            )
        if self.log_format not in ("auto", "json", "logfmt"):
            raise SettingsError(
                f"--log-format must be auto, json or logfmt, got {self.log_format!r}"
            )
        if self.queue_sla_s <= 0:
            raise SettingsError("queue_sla_s must be positive")
        if self.priority_aging_s < 0:
            raise SettingsError("priority_aging_s must be >= 0 (0 turns aging off)")
        if not all(isinstance(m, ModelEndpoint) for m in self.models.values()):
            raise SettingsError("models must map names to ModelEndpoint (see parse_models)")
        if not all(isinstance(r, RateLimit) for r in self.rate_limits.values()):
            raise SettingsError("rate_limits must map names to RateLimit (see parse_rate_limits)")
        for name, model in self.models.items():
            if model.rate_limit and model.rate_limit not in self.rate_limits:
                raise SettingsError(
                    f"models.{name}.rate_limit names {model.rate_limit!r}, which is not among "
                    f"the rate limits ({', '.join(sorted(self.rate_limits)) or 'none'}): "
                    "define it in MESH_RATE_LIMITS or [rate_limits]"
                )
        if self.rate_limit_lease_s <= self.heartbeat_interval_s:
            raise SettingsError(
                "rate_limit_lease_s must exceed heartbeat_interval_s (the heartbeat renews it)"
            )
        for advertised, target in self.dial.items():
            for addr in (advertised, target):
                host, _, port = addr.rpartition(":")
                if not host or not port.isdigit():
                    raise SettingsError(f"dial entries must be HOST:PORT=HOST:PORT, got {addr!r}")
        if (
            self.unsafe_disable_fencing
            and os.environ.get(UNSAFE_FENCING_ACK_ENV) != UNSAFE_FENCING_ACK
        ):
            raise SettingsError(
                "unsafe_disable_fencing lets stale owners overwrite runs and exists only for "
                f"the chaos checker's own test; set {UNSAFE_FENCING_ACK_ENV}={UNSAFE_FENCING_ACK} "
                "to acknowledge that, or leave it off"
            )

    def replicated_policy(self) -> dict[str, Any]:
        """The ``configure`` command's fields, as the state machine stores them."""
        return {
            "tenant_caps": dict(self.tenant_caps),
            "default_tenant_cap": self.default_tenant_cap,
            "tenant_max_queued": dict(self.tenant_max_queued),
            "default_tenant_max_queued": self.default_tenant_max_queued,
            "retry": {
                "backoff_base_ms": int(self.retry_backoff_base_s * 1000),
                "backoff_max_ms": int(self.retry_backoff_max_s * 1000),
                "retry_timeouts": self.retry_timeouts,
                "count_lost_owner": self.count_lost_owner,
            },
            "aging_ms": round(self.priority_aging_s * 1000),
            # A consistent-hash mesh places every run on its key's home peer,
            # which a finish on another peer cannot know is free.
            "handoff": self.placement != CONSISTENT_HASH,
            "prefetch": self.prefetch,
            "command_ttl_ms": SHORT_COMMAND_TTL_MS,
        }

    def dial_addr(self, advertised: str) -> str:
        """Where to connect to reach ``advertised``."""
        return self.dial.get(advertised, advertised)

    @property
    def all_loopback(self) -> bool:
        """Whether every address this peer binds, names or dials is loopback."""
        addrs = (self.raft, self.http, *self.peers, *self.dial, *self.dial.values())
        return all(_is_loopback(addr) for addr in addrs)

    def check_secret(self) -> None:
        """Refuse to run without a cluster secret unless everything is loopback.

        Raft traffic is pickle: whoever can produce a frame under the secret
        runs code in the peer. Only a peer that nobody else can reach may make
        up its own secret (mesh/credentials.py).
        """
        if not self.secret and not self.all_loopback:
            raise SettingsError(
                "a cluster secret is required when any address (own, peer or dial target) "
                "is not loopback: set MESH_SECRET_FILE to a file holding it (or MESH_SECRET); "
                "Raft traffic must be encrypted with it"
            )

    @property
    def http_scheme(self) -> str:
        """How peers (and this peer's clients) reach each other's HTTP API."""
        return "https" if self.tls_cert else "http"

    def check_auth(self) -> None:
        """Refuse an open API where others can reach it, and a broken tokens file.

        Without a token of any kind every caller is an admin of every tenant;
        that is only the peer's own user's business on loopback.
        """
        if self.api_tokens_file:
            try:
                load_tokens(self.api_tokens_file)
            except TokensFileError as exc:
                raise SettingsError(str(exc)) from exc
        elif not self.api_token and not self.insecure_no_auth and not _is_loopback(self.http):
            raise SettingsError(
                f"the HTTP API binds {self.http}, which is not loopback, and no token is "
                "configured: set --api-tokens-file (MESH_API_TOKENS_FILE) or "
                "MESH_API_TOKEN_FILE, or pass --insecure-no-auth to serve it open"
            )

    @classmethod
    def load(cls, flags: dict[str, Any], config_file: str | None = None) -> Settings:
        """Merge TOML, MESH_* environment and flags (None means "not given")."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        merged: dict[str, Any] = {}
        if config_file:
            with open(config_file, "rb") as fh:
                data = tomllib.load(fh)
            unknown = set(data) - set(names)
            if unknown:
                raise SettingsError(f"unknown settings in {config_file}: {sorted(unknown)}")
            merged.update(data)
        for name in names:
            env = os.environ.get(f"MESH_{name.upper()}")
            if env is not None and env != "":
                merged[name] = env
        unknown = set(flags) - set(names)
        if unknown:
            raise SettingsError(f"unknown settings: {sorted(unknown)}")
        merged.update({k: v for k, v in flags.items() if v is not None})
        values = {k: _coerce(names[k], v) for k, v in merged.items()}
        try:
            chat_env = env_default_model(os.environ)
        except ModelConfigError as exc:
            raise SettingsError(str(exc)) from exc
        if chat_env is not None:
            values["models"] = {**values.get("models", {}), DEFAULT_MODEL: chat_env}
        return cls(**values)._with_secret_files()

    def _with_secret_files(self) -> Settings:
        """Read ``secret_file`` and ``api_token_file`` into their values."""
        found: dict[str, str] = {}
        for value, path, env in (
            ("secret", self.secret_file, "MESH_SECRET"),
            ("api_token", self.api_token_file, "MESH_API_TOKEN"),
        ):
            if not path:
                continue
            if getattr(self, value):
                raise SettingsError(
                    f"both {env} (or its flag) and {env}_FILE are set: keep only {env}_FILE"
                )
            found[value] = read_secret_file(path, value.replace("_", " "))
        if not found:
            return self
        return dataclasses.replace(
            self,
            secret=found.get("secret", self.secret),
            api_token=found.get("api_token", self.api_token),
        )


def read_secret_file(path: str, what: str) -> str:
    """The secret a file holds, without surrounding whitespace."""
    try:
        with open(path, encoding="utf-8") as fh:
            value = fh.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"cannot read the {what} from {path}: {exc}") from exc
    if not value:
        raise SettingsError(f"{path} is empty: it must hold the {what}")
    return value


def _coerce(f: dataclasses.Field[Any], value: Any) -> Any:
    kind = str(f.type)
    try:
        if kind == "int | None":
            return None if value is None or str(value).lower() in ("", "none") else int(value)
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError("expected true or false")
                return value.lower() in ("1", "true", "yes")
            return bool(value)
        if kind == "dict[str, int]":
            pairs = _parse_labels(value) if isinstance(value, str) else dict(value)
            return {str(k): int(v) for k, v in pairs.items()}
        if kind == "dict[str, ModelEndpoint]":
            return parse_models(value)
        if kind == "dict[str, RateLimit]":
            return parse_rate_limits(value)
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        if kind.startswith("tuple"):
            if isinstance(value, str):
                return tuple(v.strip() for v in value.split(",") if v.strip())
            return tuple(value)
        if kind.startswith("dict"):
            if isinstance(value, str):
                return _parse_labels(value)
            return {str(k): str(v) for k, v in dict(value).items()}
        return str(value)
    except (ModelConfigError, RateLimitConfigError) as exc:  # a model's value may hold a key
        raise SettingsError(f"setting {f.name}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"setting {f.name}: cannot use {value!r}: {exc}") from exc


def _parse_labels(text: str) -> dict[str, str]:
    """``gpu=a100,pool=cpu`` → {"gpu": "a100", "pool": "cpu"}."""
    labels = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, sep, val = part.partition("=")
        if not sep:
            raise ValueError(f"label {part!r} is not key=value")
        labels[key.strip()] = val.strip()
    return labels


def _is_loopback(addr: str) -> bool:
    host = addr.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
