"""Tiny typed readers for TOML tables, used by config.py (reup.toml) and fleet.py (fleet.toml).

Each reader takes a key out of a table with a type check and a default, and
`reject_unknown` turns any key left over into a `ConfigError`, so that a typo in
a configuration file is an error rather than a silently ignored setting.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from reup.core.errors import ConfigError

T = TypeVar("T")
_MISSING: Any = object()


class Table:
    """A TOML table being read; remembers which keys were consumed."""

    def __init__(self, data: Mapping[str, Any], where: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a table, got {type(data).__name__}")
        self.data = data
        self.where = where
        self.seen: set[str] = set()

    def _get(self, key: str, default: Any) -> Any:
        self.seen.add(key)
        if key in self.data:
            return self.data[key]
        if default is _MISSING:
            raise ConfigError(f"{self.where}: missing required key '{key}'")
        return default

    def text(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if value is not default and not isinstance(value, str):
            raise ConfigError(f"{self.where}.{key}: expected a string, got {value!r}")
        return value

    def integer(self, key: str, default: Any = _MISSING, *, minimum: int | None = None) -> Any:
        value = self._get(key, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.where}.{key}: expected an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise ConfigError(f"{self.where}.{key}: must be >= {minimum}, got {value}")
        return value

    def number(self, key: str, default: Any = _MISSING, *, minimum: float | None = None) -> Any:
        value = self._get(key, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{self.where}.{key}: expected a number, got {value!r}")
        if minimum is not None and value < minimum:
            raise ConfigError(f"{self.where}.{key}: must be >= {minimum}, got {value}")
        return float(value)

    def flag(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if value is not default and not isinstance(value, bool):
            raise ConfigError(f"{self.where}.{key}: expected true or false, got {value!r}")
        return value

    def strings(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if value is default:
            return value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{self.where}.{key}: expected a list of strings, got {value!r}")
        return tuple(value)

    def table(self, key: str, *, required: bool = False) -> Table:
        value = self._get(key, _MISSING if required else {})
        return Table(value, f"{self.where}.{key}" if self.where else key)

    def str_map(self, key: str) -> dict[str, str]:
        value = self._get(key, {})
        if not isinstance(value, Mapping):
            raise ConfigError(f"{self.where}.{key}: expected a table, got {value!r}")
        out: dict[str, str] = {}
        for k, v in value.items():
            if isinstance(v, bool):
                v = "true" if v else "false"
            if not isinstance(v, str | int | float):
                raise ConfigError(f"{self.where}.{key}.{k}: expected a string, got {v!r}")
            out[str(k)] = str(v)
        return out

    def choice(self, key: str, choices: tuple[str, ...], default: Any = _MISSING) -> Any:
        value = self.text(key, default)
        if value is not default and value not in choices:
            raise ConfigError(f"{self.where}.{key}: expected one of {', '.join(choices)}, got {value!r}")
        return value

    def reject_unknown(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            where = f"{self.where}: " if self.where else ""
            raise ConfigError(f"{where}unknown key{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}")
