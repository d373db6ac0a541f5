"""Configuration: built-in defaults < TOML file < `AUND_*` environment < command-line flags, merged
into one immutable `Config`, each value remembering where it came from (for `aund config show`).

Unknown keys and wrong types are errors at start that name the file (or variable) and the key.
Secrets are never configuration: the encryption seed comes only from `AUND_ENCRYPTION_SEED` or a
systemd credential (see aund.identity.store.load_seed). Stdlib only.
"""
from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from client_stub import localsock
from client_stub.errors import InvalidParams

DEFAULT_CONFIG_FILE = Path("/etc/aund/aund.toml")
MIN_GATEWAY_FRAME = 64 * 1024


LOG_LEVELS = ("debug", "info", "warning", "error")  # aund.logs.LEVELS (this module imports no logging)


class ConfigError(InvalidParams):
    """The configuration is invalid; the message names the source and the key."""


def _running_as_system() -> bool:
    return os.geteuid() == 0 or bool(os.environ.get("STATE_DIRECTORY") and os.environ.get("RUNTIME_DIRECTORY"))


def default_state_dir() -> Path:
    if os.environ.get("STATE_DIRECTORY"):  # systemd StateDirectory=
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    if os.geteuid() == 0:
        return Path("/var/lib/aund")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "aund"


def default_socket(env: Mapping[str, str] | None = None) -> Path:
    """The daemon's socket by default: systemd's RuntimeDirectory=, else /run/aund/aund.sock as root,
    else the user's socket of client_stub.localsock ($XDG_RUNTIME_DIR/aund/aund.sock, without it
    ~/.local/state/aund/run/aund.sock; never a fixed name under /tmp that another user can take
    first). Apps resolve the same rule from the same module."""
    env = os.environ if env is None else env
    if env.get("RUNTIME_DIRECTORY"):
        return Path(env["RUNTIME_DIRECTORY"].split(":")[0]) / "aund.sock"
    if os.geteuid() == 0:
        return localsock.SYSTEM_SOCKET
    return localsock.user_socket_path(env)


@dataclass(frozen=True)
class Config:
    state_dir: Path = field(default_factory=default_state_dir)
    socket: Path = field(default_factory=default_socket)
    gateway_url: tuple[str, ...] = ()        # explicit gateways (in priority order); empty = discovery
    root_ca: tuple[Path, ...] = ()           # extra trusted AUN roots (PEM), e.g. the devnet's
    identities: tuple[str, ...] = ()         # AIDs kept connected from start (slot `slot_id`)
    slot_id: str = "main"                    # the slot configured links use (apps' default too)
    discovery_port: int = 0                  # 0 = the standard HTTPS port
    call_timeout: float = 35.0
    global_in_flight: int = 256              # daemon-wide RPC budget across all links
    connect_concurrency: int = 64            # gateway handshakes (login, WebSocket, auth.connect) at once
    idle_link_seconds: float = 300.0         # on-demand links close this long after the last app lets go
    shutdown_grace: float = 10.0
    sync_poll_seconds: float = 30.0          # a quiet link checks for messages whose push was lost
    gateway_max_frame: int = 0               # largest WebSocket message from a gateway; 0 = built-in 8 MiB
    cert_renew_fraction: float = 0.33        # renew an AID certificate once less than this share of its validity is left
    policy: Mapping[str, Any] = field(default_factory=dict)
    limits: Mapping[str, Any] = field(default_factory=dict)  # [limits]: aund.broker.Limits fields
    log_level: str = "info"                  # debug, info, warning or error (AUND_DEBUG=true: debug)
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    def merged(self, values: Mapping[str, Any], source: str) -> "Config":
        """A new Config with `values` applied (validated), each recorded as coming from `source`."""
        known = {f.name: f for f in fields(self) if f.name != "sources"}
        changes: dict[str, Any] = {}
        for key, raw in values.items():
            if key not in known:
                raise ConfigError(f"{source}: unknown key {key!r}")
            changes[key] = _coerce(key, raw, getattr(self, key), source)
            if key == "gateway_max_frame" and 0 < changes[key] < MIN_GATEWAY_FRAME:
                raise ConfigError(f"{source}: key {key!r} must be 0 (the built-in limit) or at least "
                                  f"{MIN_GATEWAY_FRAME} bytes")
            if key == "global_in_flight" and changes[key] < 2:
                raise ConfigError(f"{source}: key {key!r} must be at least 2 (one call is kept for the "
                                  "daemon's own work)")
        new_sources = dict(self.sources)
        new_sources.update({k: source for k in changes})
        return replace(self, **changes, sources=new_sources)

    def source_of(self, key: str) -> str:
        return self.sources.get(key, "default")

    def redacted(self) -> dict[str, Any]:
        """Every effective value with its source, for `aund config show` (nothing here is secret)."""
        out = {}
        for f in fields(self):
            if f.name == "sources":
                continue
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = [str(v) for v in value]
            elif isinstance(value, Mapping):
                value = dict(value)
            out[f.name] = {"value": value, "source": self.source_of(f.name)}
        out["encryption_seed"] = {"value": "<from AUND_ENCRYPTION_SEED or credentials; never shown>",
                                  "source": "environment/credential"}
        return out


def _coerce(key: str, raw: Any, current: Any, source: str) -> Any:
    where = f"{source}: key {key!r}"
    if isinstance(current, Path):
        if not isinstance(raw, (str, Path)) or not str(raw):
            raise ConfigError(f"{where} must be a path string")
        return Path(os.path.expanduser(str(raw)))
    if isinstance(current, bool):
        if not isinstance(raw, bool):
            raise ConfigError(f"{where} must be true or false")
        return raw
    if isinstance(current, int) and not isinstance(current, bool):
        if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
            raise ConfigError(f"{where} must be a non-negative integer")
        return raw
    if isinstance(current, float):
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or raw <= 0:
            raise ConfigError(f"{where} must be a positive number")
        return float(raw)
    if isinstance(current, str):
        if not isinstance(raw, str) or not raw:
            raise ConfigError(f"{where} must be a non-empty string")
        if key == "log_level" and raw.strip().lower() not in LOG_LEVELS:
            raise ConfigError(f"{where} must be one of {', '.join(LOG_LEVELS)}, got {raw!r}")
        return raw.strip().lower() if key == "log_level" else raw
    if isinstance(current, tuple):
        items = [raw] if isinstance(raw, (str, Path)) else raw
        if not isinstance(items, (list, tuple)) or not all(isinstance(i, (str, Path)) and str(i) for i in items):
            raise ConfigError(f"{where} must be a string or a list of strings")
        if key == "root_ca":
            return tuple(Path(os.path.expanduser(str(i))) for i in items)
        if key == "identities":
            return tuple(str(i).strip().lower() for i in items)
        return tuple(str(i) for i in items)
    if isinstance(current, Mapping):
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where} must be a table")
        return dict(raw)
    raise ConfigError(f"{where}: unsupported type")  # pragma: no cover


#: Environment variables and the keys they set; list values are comma-separated.
ENV_KEYS = {"AUND_STATE_DIR": "state_dir", "AUND_SOCKET": "socket", "AUND_GATEWAY_URL": "gateway_url",
            "AUND_ROOT_CA": "root_ca", "AUND_IDENTITIES": "identities", "AUND_SLOT_ID": "slot_id",
            "AUND_CALL_TIMEOUT": "call_timeout", "AUND_DISCOVERY_PORT": "discovery_port",
            "AUND_SYNC_POLL_SECONDS": "sync_poll_seconds", "AUND_LOG_LEVEL": "log_level", "AUND_GATEWAY_MAX_FRAME": "gateway_max_frame"}


def _env_value(key: str, text: str) -> Any:
    current = getattr(Config(), key)
    if isinstance(current, tuple):
        return [p.strip() for p in text.split(",") if p.strip()]
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"environment: {key} must be a number, got {text!r}") from None
    if isinstance(current, int):
        if not text.isdigit():
            raise ConfigError(f"environment: {key} must be a non-negative integer, got {text!r}")
        return int(text)
    return text


def load(config_file: Path | None = None, flags: Mapping[str, Any] | None = None,
         env: Mapping[str, str] | None = None) -> Config:
    """Merge defaults, the TOML file (the given one must exist; the default one may not), the
    environment and the flags (None values are ignored). Raises ConfigError."""
    env = os.environ if env is None else env
    config = Config()
    path = config_file or (Path(env["AUND_CONFIG"]) if env.get("AUND_CONFIG") else None)
    if path is None and DEFAULT_CONFIG_FILE.exists():
        path = DEFAULT_CONFIG_FILE
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        config = config.merged(data, str(path))
    for var, key in ENV_KEYS.items():
        if env.get(var):
            config = config.merged({key: _env_value(key, env[var])}, f"environment {var}")
    return config.merged({k: v for k, v in (flags or {}).items() if v is not None}, "command line")
