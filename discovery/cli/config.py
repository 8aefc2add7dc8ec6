"""The client's configuration: `client.toml`, written by `discovery cluster up` or by hand.

    agent = "127.0.0.1:7001"            # default agent
    [nodes]  node1 = "127.0.0.1:7001"   # lets `--agent node1` name an agent
    [tls]    ca = "...", cert = "...", key = "..."

The CLI finds its client config at --config, else $DISCOVERY_CONFIG, else
$DISCOVERY_HOME/client.toml (default ~/.config/discovery/client.toml). An agent.toml works too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from discovery.toml_config import ConfigError, identity, read_toml
from discovery.toml_config import field as toml_field
from overlay.wire import tls
from overlay.wire.rpc import split_addr


def home() -> Path:
    return Path(os.environ.get("DISCOVERY_HOME", Path.home() / ".config" / "discovery"))



@dataclass
class ClientConfig:
    identity: tls.Identity
    agent: str = ""
    nodes: dict[str, str] = field(default_factory=dict)

    def resolve(self, agent: str | None) -> str:
        """An agent given as host:port or as a node name known to this config."""
        target = agent or self.agent
        if not target:
            raise ConfigError("no agent given: use --agent HOST:PORT (or NODE) or set 'agent' in the client config")
        if target in self.nodes:
            return self.nodes[target]
        try:
            split_addr(target)
        except ValueError:
            known = ", ".join(sorted(self.nodes)) or "none"
            raise ConfigError(f"unknown agent {target!r}: not host:port nor a known node ({known})") from None
        return target


def client_config_path(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    if os.environ.get("DISCOVERY_CONFIG"):
        return Path(os.environ["DISCOVERY_CONFIG"])
    return home() / "client.toml"


def load_client_config(explicit: str | None) -> ClientConfig:
    path = client_config_path(explicit)
    if not path.exists():
        raise ConfigError(f"{path}: no client config; start a cluster with 'discovery cluster up' "
                          "or pass --config FILE")
    data = read_toml(path)
    nodes = toml_field(data, "nodes", dict, path, {})
    agent = toml_field(data, "agent", str, path, "") or toml_field(data, "listen", str, path, "")
    return ClientConfig(identity=identity(data, path), agent=agent,
                        nodes={k: v for k, v in nodes.items() if isinstance(v, str)})
