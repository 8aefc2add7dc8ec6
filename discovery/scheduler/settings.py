"""The `[dvms]` table of agent.toml: the load injector and the monitor's thresholds, checked field by field.

    [dvms]
    injector_rate = 0.0                 # λ: CPU demand changes per VM per second (test driver); 0: none
    injector_mean = 70.0                # each change draws from N(mean, std), percent of one vCPU
    injector_std = 30.0
    seed = 0                            # of the injector's per-VM streams
    overload = 1.0                      # node overloaded above this fraction of its capacity ...
    overload_clear = 0.9                # ... until below this one (a plan must bring it there)
    underload = 0.0                     # consolidation: a node below this (0: never) for underload_dwell
    underload_clear = 0.3               #   seconds is emptied onto others; it is normal again from here
    underload_dwell = 60.0
    retry = 5.0                         # seconds before a node still in trouble starts a partition again
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from discovery.toml_config import ConfigError
from dvms.monitor import Thresholds
from dvms.workload import MEAN, STD


@dataclass(frozen=True)
class DvmsSettings:
    """The `[dvms]` table of agent.toml (module doc): the load injector and the monitor's thresholds."""

    injector_rate: float = 0.0
    injector_mean: float = MEAN
    injector_std: float = STD
    seed: int = 0
    overload: float = Thresholds.overload
    overload_clear: float = Thresholds.overload_clear
    underload: float = 0.0  # consolidation moves VMs for no overload: off unless asked for
    underload_clear: float = Thresholds.underload_clear
    underload_dwell: float = Thresholds.underload_dwell
    retry: float = 5.0

    def thresholds(self) -> Thresholds:
        return Thresholds(overload=self.overload, overload_clear=self.overload_clear, underload=self.underload,
                          underload_clear=self.underload_clear, underload_dwell=self.underload_dwell)


def dvms_settings(table: dict[str, Any], path: Path | str) -> DvmsSettings:
    """A `[dvms]` table checked field by field; ConfigError naming the first bad one (also for unknown keys,
    so that a misspelt threshold is not silently the default)."""
    known = [f.name for f in fields(DvmsSettings)]
    for key in table:
        if key not in known:
            raise ConfigError(f"{path}: unknown field 'dvms.{key}' (known: {', '.join(known)})")
    values: dict[str, Any] = {}
    for key, value in table.items():
        integer = key == "seed"
        if (isinstance(value, bool) or not isinstance(value, int if integer else int | float)
                or not math.isfinite(value)):
            raise ConfigError(f"{path}: field 'dvms.{key}' must be {'an integer' if integer else 'a number'}, "
                              f"got {value!r}")
        values[key] = value if integer else float(value)
    s = DvmsSettings(**values)
    rules = [  # (field, holds, what it must be); ordered so that the field named is the one to fix
        ("injector_rate", s.injector_rate >= 0, ">= 0 (0: no injector)"),
        ("injector_mean", s.injector_mean >= 0, ">= 0"),
        ("injector_std", s.injector_std > 0, "> 0"),
        ("overload", s.overload > 0, "> 0"),
        ("overload_clear", 0 < s.overload_clear <= s.overload, f"in (0, overload = {s.overload:g}]"),
        ("underload", 0 <= s.underload <= s.underload_clear,
         f"in [0, underload_clear = {s.underload_clear:g}] (0: no consolidation)"),
        ("underload_clear", s.underload_clear <= s.overload_clear, f"<= overload_clear = {s.overload_clear:g}"),
        ("underload_dwell", s.underload_dwell >= 0, ">= 0 (seconds)"),
        ("retry", s.retry > 0, "> 0 (seconds)"),
    ]
    for key, holds, must in rules:
        if not holds:
            raise ConfigError(f"{path}: field 'dvms.{key}' must be {must}, got {getattr(s, key)!r}")
    return s
