"""Reading TOML configuration files with one-line errors that name the file and the field.

Shared by the client's config (`discovery.cli.config`) and the agent's (`discovery.agent_config`); it
must stay light, since the CLI imports it on every start.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from overlay.wire import tls
from overlay.wire.rpc import split_addr


class ConfigError(Exception):
    """A configuration file is missing, unreadable or wrong; the message names file and field."""


def read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror or err}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None


def field(data: dict[str, Any], key: str, kind: type, path: Path, default: Any = ..., where: str = "") -> Any:
    name = f"{where}{key}"
    if key not in data:
        if default is ...:
            raise ConfigError(f"{path}: missing field {name!r}")
        return default
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{path}: field {name!r} must be {kind.__name__}, got {value!r}")
    return value


def address(value: Any, path: Path, name: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{path}: field {name!r}: expected a host:port string, got {value!r}")
    try:
        split_addr(value)
    except ValueError as err:
        raise ConfigError(f"{path}: field {name!r}: {err}") from None
    return value


def identity(data: dict[str, Any], path: Path) -> tls.Identity:
    section = field(data, "tls", dict, path)
    base = path.parent
    files = {k: base / field(section, k, str, path, where="tls.") for k in ("ca", "cert", "key")}
    return tls.Identity(cert=files["cert"], key=files["key"], ca=files["ca"])
