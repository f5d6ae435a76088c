"""Server settings: `DIR/server.toml`, overridden by `OPENBEEPBOOP_<NAME>` variables.

Precedence, highest first: explicit arguments (CLI flags), environment, the TOML file,
defaults. Every field is documented in docs/configuration.md.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import platformdirs
import tomli_w
from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from openbeepboop.private_paths import private_dir, secret_from_file_variable, write_private

CONFIG_NAME = "server.toml"
DAY = 86_400.0
DB_NAME = "openbeepboop.db"


class ConfigError(Exception):
    """A config file or variable is wrong; the message says which and why."""


class StartupRefused(ConfigError):
    """What the server found at start, its store open, forbids serving (a key given in
    the environment is stored under another role); the message says what."""


ENV_PREFIX = "OPENBEEPBOOP_"
# the keys an operator may give the server (setting -> role), each also from a file that
# OPENBEEPBOOP_<NAME>_FILE names (Docker secrets)
GIVEN_KEYS = {"admin_key": "admin", "node_key": "node", "client_key": "client"}


def given_key_source(name: str) -> str:
    """Where the key setting `name` was read from, for messages (never its value)."""
    var = ENV_PREFIX + name.upper()
    if os.environ.get(var + "_FILE"):
        return f"{var}_FILE ({os.environ[var + '_FILE']})"
    if os.environ.get(var):
        return var
    return f"the setting {name}"


class KeyFiles(PydanticBaseSettingsSource):
    """`OPENBEEPBOOP_<NAME>_FILE`: the file it names holds the key setting (stripped),
    as official images read Docker secrets. Giving the variable and the file is an
    error, as is a file that cannot be read or is empty."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # __call__ reads them all

    def __call__(self) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for name in GIVEN_KEYS:
            try:
                text = secret_from_file_variable(ENV_PREFIX + name.upper())
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            if text:
                found[name] = text
        return found


def default_data_dir() -> Path:
    """Where the server keeps its files when no `--data-dir` is given."""
    return Path(platformdirs.user_data_dir("openbeepboop", appauthor=False))


class ServerSettings(BaseSettings):
    """Everything the server reads at start. Field names are the TOML keys; the
    environment variable is `OPENBEEPBOOP_` + the name in upper case."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, populate_by_name=True
    )

    data_dir: Path = Field(default_factory=default_data_dir, description="Where files live.")
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on.")
    database_url: str = Field(
        "",
        description="sqlite:///PATH, postgresql://USER@HOST:PORT/DB, or empty for "
        "DIR/openbeepboop.db.",
    )
    database_pool_size: int = Field(
        10, ge=1, le=1000, description="PostgreSQL connections per server process."
    )
    lease_seconds: float = Field(60.0, gt=0, description="Lease length without a heartbeat.")
    lease_grace_seconds: float | None = Field(
        None,
        ge=0,
        description="After an outage of the whole deployment: leases run at least this "
        "long once a server is back (empty: lease_seconds; 0: no grace).",
    )
    max_attempts: int = Field(3, ge=1, le=100, description="Default fetches before failing.")
    reaper_interval_seconds: float = Field(1.0, gt=0, description="How often leases are reaped.")
    node_ttl_seconds: float = Field(
        60.0, gt=0, description="A node is live this long after contact."
    )
    node_retention_seconds: float = Field(
        7 * 86400.0, gt=0, description="A node's row is forgotten this long after contact."
    )
    max_body_bytes: int = Field(16 * 1024 * 1024, gt=0, description="Largest request body.")
    max_header_bytes: int = Field(
        64 * 1024, ge=1024, description="Largest request line plus headers (431 above)."
    )
    header_timeout_seconds: float = Field(
        10.0, gt=0, description="A request's line and headers must arrive within this (408)."
    )
    body_timeout_seconds: float = Field(
        30.0, gt=0, description="Longest pause while a request body arrives."
    )
    max_connections_per_client: int = Field(
        256, ge=0, description="Open connections one client address may hold; 0: no cap."
    )
    max_jobs_per_request: int = Field(10_000, gt=0, description="Largest bulk submit.")
    max_file_bytes: int = Field(
        200 * 1024 * 1024, gt=0, description="Largest file upload (POST /v1/files)."
    )
    max_batch_lines: int = Field(50_000, gt=0, description="Most requests in one batch file.")
    max_batch_line_bytes: int = Field(
        4 * 1024 * 1024, gt=0, description="Longest line of a batch input file, in bytes."
    )
    file_quota_bytes: int = Field(
        1024 * 1024 * 1024,
        ge=0,
        description="Bytes of files one key may keep (uploads and batch output); 0: no quota.",
    )
    file_expiry_seconds: float = Field(
        30 * DAY,
        ge=0,
        description="Default lifetime of an uploaded file of a purpose other than `batch` "
        "(when the upload gives no `expires_after`); 0: kept until deleted.",
    )
    keep_completed_jobs_seconds: float = Field(
        30 * DAY, ge=0, description="Completed jobs (and results) are kept this long; 0: forever."
    )
    keep_failed_jobs_seconds: float = Field(
        30 * DAY, ge=0, description="Failed and expired jobs are kept this long; 0: forever."
    )
    keep_cancelled_jobs_seconds: float = Field(
        7 * DAY, ge=0, description="Cancelled jobs are kept this long; 0: forever."
    )
    keep_batches_seconds: float = Field(
        30 * DAY,
        ge=0,
        description="Finished batches (and their files without an expiry) are kept this long; "
        "0: forever.",
    )
    prune_interval_seconds: float = Field(
        60.0, ge=0, description="How often old rows are pruned in the background; 0: never."
    )
    prune_batch_rows: int = Field(
        500, ge=1, le=100_000, description="Rows deleted per pruning transaction."
    )
    prune_share: float = Field(
        0.1,
        gt=0,
        le=1,
        description="The share of the time the pruner may take: after a transaction that "
        "took t seconds it pauses t * (1 - share) / share.",
    )
    batch_priority: int = Field(
        -10, ge=-1000, le=1000, description="Priority of batch lines (interactive: 0)."
    )
    rate_limit: str = Field(
        "200/second;6000/minute",
        description="Per-key request limit (the `limits` notation); empty disables it.",
    )
    node_rate_limit: str = Field("", description="Per-key request limit for node keys.")
    max_active_jobs_per_key: int = Field(
        100_000, gt=0, description="Queued plus running jobs one client key may have."
    )
    quota_jobs_per_hour: int = Field(
        0,
        ge=0,
        description="Jobs per hour a share (a key's group, or the key) may submit unless "
        "`shares set` gave it its own quota; 0: no quota.",
    )
    quota_tokens_per_hour: int = Field(
        0,
        ge=0,
        description="Tokens per hour (prompt plus completion) a share may use unless "
        "`shares set` gave it its own quota; 0: no quota.",
    )
    key_recheck_seconds: float = Field(
        2.0,
        gt=0,
        description="How often open WebSockets and event streams check that their key "
        "was not revoked (by another server or the CLI).",
    )
    sync_timeout_seconds: float = Field(600.0, gt=0, description="Longest synchronous wait.")
    model_wait_seconds: float = Field(
        10.0, ge=0, description="Sync requests wait this long for a node serving the model."
    )
    max_poll_wait_seconds: float = Field(60.0, gt=0, description="Longest long-poll.")
    fair_share: bool = Field(
        True,
        description="Within one priority, serve the shares (key groups, or keys) with "
        "queued jobs of a model in weighted turn; false: oldest job first.",
    )
    affinity_max_wait_seconds: float = Field(
        30.0,
        ge=0,
        description="Model affinity: how long a job of another model may wait while a node "
        "keeps serving the model it has loaded (0: no affinity).",
    )
    sqlite_synchronous: Literal["FULL", "NORMAL"] = Field(
        "FULL", description="FULL: every acknowledged write survives power loss."
    )
    metrics_public: bool = Field(True, description="Serve /metrics without a key.")
    opentelemetry: bool = Field(
        False,
        description="FastAPI's OpenTelemetry spans and metrics for every request, once an "
        "OpenTelemetry SDK is set up in the process (off: its check costs ~5 % CPU per call).",
    )
    fast_lane: bool = Field(
        True,
        description="Serve the hottest calls past FastAPI's routing (same answers, less CPU).",
    )
    web_ui: Literal["on", "off", "loopback"] = Field(
        "on",
        description="The web interface at /: on, off, or loopback (answered only to "
        "browsers on this machine; the API is not affected).",
    )
    web_session_seconds: float = Field(
        7 * DAY, gt=0, description="How long a web interface login lasts."
    )
    log_level: str = Field("info", description="uvicorn log level.")
    # keys the operator gives (containers): made sure of at every start (docs/security.md)
    admin_key: SecretStr | None = Field(
        None,
        description="An admin key (obb_admin_...) the server makes sure exists at every "
        "start; better given as OPENBEEPBOOP_ADMIN_KEY or OPENBEEPBOOP_ADMIN_KEY_FILE.",
    )
    node_key: SecretStr | None = Field(
        None,
        description="A node key (obb_node_...) made sure of at every start; "
        "OPENBEEPBOOP_NODE_KEY or OPENBEEPBOOP_NODE_KEY_FILE.",
    )
    client_key: SecretStr | None = Field(
        None,
        description="A client key (obb_client_...) made sure of at every start; "
        "OPENBEEPBOOP_CLIENT_KEY or OPENBEEPBOOP_CLIENT_KEY_FILE.",
    )
    # the swarm (docs/swarm.md); LlamaNet's DHT_PORT, BOOTSTRAP_NODES and HEARTBEAT_INTERVAL
    # are read too, below the OPENBEEPBOOP_ names
    dht_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        validation_alias=AliasChoices("openbeepboop_dht_port", "DHT_PORT"),
        description="Join a swarm: the UDP port of this server's Kademlia DHT node (0: any "
        "free port); empty: no swarm.",
    )
    dht_host: str = Field(
        "", description="Address the DHT node listens on; empty: the same as `host`."
    )
    bootstrap: str = Field(
        "",
        validation_alias=AliasChoices("openbeepboop_bootstrap", "BOOTSTRAP_NODES"),
        description="DHT addresses of swarm members to join through: host:port,host:port.",
    )
    heartbeat_interval: float = Field(
        10.0,
        ge=0.2,
        le=200,
        validation_alias=AliasChoices("openbeepboop_heartbeat_interval", "HEARTBEAT_INTERVAL"),
        description="Seconds between republishing this server's record in the DHT (a record "
        "expires after three intervals without one).",
    )
    swarm_secret: str = Field(
        "",
        description="The secret every member of the swarm shares (16 characters or more); "
        "empty: one is made and kept in DIR/swarm-secret (a swarm of one until it is shared).",
    )
    server_id: str = Field(
        "",
        pattern=r"^([A-Za-z0-9][A-Za-z0-9_.-]{0,63})?$",
        description="This server's id in the swarm; empty: made once and kept in DIR/server-id.",
    )
    server_name: str = Field(
        "", max_length=64, description="A name people recognise; empty: the host name."
    )
    public_url: str = Field(
        "",
        description="The URL other members and clients reach this server at; empty: "
        "http://HOST:PORT (with this machine's address when HOST is 0.0.0.0).",
    )

    forward_concurrency: int = Field(
        16,
        ge=1,
        le=1024,
        description="In a swarm: jobs per model forwarded to other members at once (for "
        "models none of this server's own nodes serve).",
    )

    cache_policy: Literal["deterministic", "all", "opt-in", "off"] = Field(
        "deterministic",
        description="Which requests the response cache answers and keeps without being "
        "asked (docs/cache.md): deterministic (temperature 0, a seed, embeddings), all, "
        "opt-in (only requests asking with `cache`), or off (no cache on this server).",
    )
    cache_ttl_seconds: float = Field(
        30 * 86400.0, ge=0, description="How long a cached answer is used; 0: forever."
    )
    cache_max_bytes: int = Field(
        1 << 30,
        ge=0,
        description="The cache's size bound: beyond it the least recently used answers go.",
    )
    cache_models: dict[str, Literal["deterministic", "all", "opt-in", "off"]] = Field(
        default_factory=dict, description="Per model, a cache_policy of its own."
    )
    cache_scope: Literal["shared", "private", "off"] = Field(
        "shared",
        description="Whose answers a key's requests may be given: shared (any key's "
        "answer to the same request), private (only its own), off (never cached).",
    )
    cache_keys: dict[str, Literal["shared", "private", "off"]] = Field(
        default_factory=dict, description="Per key (by id or name), a cache_scope of its own."
    )

    model_aliases: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Model aliases with fallbacks (docs/aliases.md): a request for the alias "
        "runs on its first member a live node serves and moves to the next one when that "
        "member fails with a retryable error or no node serves it in time; members are "
        "model names, not aliases.",
    )
    alias_wait_seconds: float = Field(
        30.0,
        ge=0,
        description="A queued job of an alias whose member no live node serves moves to the "
        "next member a live node serves after waiting this long.",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        given = getattr(init_settings, "init_kwargs", {}).get("data_dir")
        data_dir = Path(given or os.environ.get("OPENBEEPBOOP_DATA_DIR") or default_data_dir())
        toml = TomlConfigSettingsSource(settings_cls, toml_file=data_dir / CONFIG_NAME)
        # a key file before the variables: an empty variable (compose's ${X:-}) is no key
        return (init_settings, KeyFiles(settings_cls), env_settings, toml)

    @field_validator("bootstrap", mode="before")
    @classmethod
    def _addresses(cls, value: object) -> object:
        if isinstance(value, list | tuple):  # TOML may give a list
            value = ",".join(str(v) for v in value)
        if isinstance(value, str):
            parse_addresses(value)  # raises ValueError with the bad entry
            return ",".join(a.strip() for a in value.split(",") if a.strip())
        return value

    @field_validator("model_aliases")
    @classmethod
    def _aliases(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        check_aliases(value)
        return value

    @field_validator("swarm_secret")
    @classmethod
    def _secret_length(cls, value: str) -> str:
        if value and len(value) < 16:
            raise ValueError("the swarm secret must be at least 16 characters")
        return value

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if value and not (value.startswith(("http://", "https://")) and urlsplit(value).hostname):
            raise ValueError(f"{value!r} is not an http:// or https:// URL")
        return value

    @property
    def bootstrap_addresses(self) -> list[tuple[str, int]]:
        """`bootstrap` as (host, port) pairs."""
        return parse_addresses(self.bootstrap)

    @property
    def config_path(self) -> Path:
        return self.data_dir / CONFIG_NAME

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, url: str) -> str:
        url = url.strip()
        if url.startswith(POSTGRES_SCHEMES):
            try:
                _ = urlsplit(url).port  # parses the host and port, or raises
            except ValueError as exc:
                raise ValueError(f"{redact_url(url)!r} is not a valid URL: {exc}") from None
        elif url and not url.startswith(SQLITE_SCHEME):
            raise ValueError(
                "use sqlite:///PATH or postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE "
                f"(got {redact_url(url)!r})"
            )
        return url

    @property
    def uses_postgres(self) -> bool:
        """Whether `database_url` names a PostgreSQL database."""
        return self.database_url.startswith(POSTGRES_SCHEMES)

    @property
    def database_label(self) -> str:
        """The database for messages: the SQLite path, or the URL without its password."""
        return redact_url(self.database_url) if self.uses_postgres else str(self.sqlite_path)

    @property
    def sqlite_path(self) -> Path:
        """The SQLite file this server uses."""
        url = self.database_url
        if not url:
            return self.data_dir / DB_NAME
        if url.startswith(SQLITE_SCHEME):
            return Path(url.removeprefix(SQLITE_SCHEME))
        raise ConfigError(f"database_url {redact_url(url)!r} is not a SQLite database")


SQLITE_SCHEME = "sqlite:///"


def check_aliases(aliases: dict[str, list[str]]) -> None:
    """ValueError naming the first mistake in `model_aliases`: an empty name or member
    list, a member named twice, an alias among its own members, or a member that is itself
    an alias (aliases do not nest, so no loop can form)."""
    for alias, members in aliases.items():
        if not alias.strip():
            raise ValueError("an alias needs a name")
        if not members:
            raise ValueError(f"alias {alias!r} has no members")
        if any(not m.strip() for m in members):
            raise ValueError(f"alias {alias!r} has an empty member name")
        if len(set(members)) != len(members):
            raise ValueError(f"alias {alias!r} names a member twice")
        if alias in members:
            raise ValueError(f"alias {alias!r} is one of its own members")
        nested = [m for m in members if m in aliases]
        if nested:
            raise ValueError(
                f"alias {alias!r} has the alias {nested[0]!r} as a member; aliases do not "
                "nest: list that alias's members instead"
            )


def parse_addresses(text: str) -> list[tuple[str, int]]:
    """`host:port,host:port` as pairs; ValueError naming the first bad one."""
    out = []
    for item in (a.strip() for a in text.split(",")):
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{item!r} is not host:port")
        out.append((host, int(port)))
    return out


POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def redact_url(url: str) -> str:
    """`url` with its password replaced by `***` (safe to print)."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not a URL we can take apart: hide all between :// and @
        scheme, sep, rest = url.partition("://")
        return f"{scheme}{sep}***@{rest.rpartition('@')[2]}" if "@" in rest else url
    if password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def load_settings(data_dir: Path | None = None, **overrides: Any) -> ServerSettings:
    """Settings for the server in `data_dir`: overrides, then environment, then the file."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if data_dir is not None:
        given["data_dir"] = data_dir.expanduser().resolve()
    try:
        return ServerSettings(**given)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{CONFIG_NAME} is not valid TOML: {exc}") from exc
    except ValidationError as exc:
        raise ConfigError(_explain(exc)) from exc
    except SettingsError as exc:  # a variable that should hold JSON does not
        raise ConfigError(f"invalid server settings: {exc} ({exc.__cause__})") from exc


def _explain(exc: ValidationError) -> str:
    lines = [f"invalid server settings (in {CONFIG_NAME} or OPENBEEPBOOP_* variables):"]
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"]) or "(settings)"
        lines.append(f"  {name}: {err['msg']}")
    return "\n".join(lines)


def write_settings(data_dir: Path, changes: dict[str, Any]) -> Path:
    """Create or update `DIR/server.toml` with `changes` (flags the user gave), keeping
    what the file already says. A new file lists every default, to be edited later.
    Environment variables are never written: they stay overrides."""
    path = data_dir / CONFIG_NAME
    if path.exists():
        values = tomllib.loads(path.read_text())
    else:
        defaults = {
            name: field.get_default(call_default_factory=True)
            for name, field in ServerSettings.model_fields.items()
            if name != "data_dir"
        }  # but the empty ones (derived from others): TOML has no empty value
        values = {name: value for name, value in defaults.items() if value is not None}
    values.update({k: v for k, v in changes.items() if v is not None})
    private_dir(path.parent, tighten=True)  # the data directory: ours alone
    text = "# OpenBeepBoop server settings; OPENBEEPBOOP_<NAME> variables override them.\n"
    write_private(path, text + tomli_w.dumps(values))  # it may hold a database password
    return path
