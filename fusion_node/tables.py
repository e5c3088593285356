"""Reading TOML tables strictly: every key is used once, so a typo is an error, not a default.

Launch files and engine specs both read their tables through `Table`, so their errors look
alike: the table, the key, the bad value, and what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fusion_node.errors import ConfigError


class Table:
    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where} must be a table, got {data!r}")
        self._data = dict(data)
        self.where = where
        self._known: list[str] = []

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        """The value of `key`, of type `kind`; without a default the key is required."""
        self._known.append(key)
        if key not in self._data:
            if default is ...:
                raise ConfigError(f"{self.where}: missing required key {key!r}")
            return default
        value = self._data.pop(key)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            try:
                value = float(value)
            except OverflowError:
                raise ConfigError(f"{self.where}.{key}: an integer of {value.bit_length()} "
                                  "bits is too large for a number") from None
        if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float)):
            raise ConfigError(f"{self.where}.{key} = {value!r} is not a "
                              f"{getattr(kind, '__name__', kind)}")
        # TOML allows inf and nan; no setting means either, and they fail later, untyped.
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{self.where}.{key} = {value!r} is not a finite number")
        return value

    def ms(self, key: str, default: float | None = None) -> int:
        """A duration in ms as integer ns; without a default the key is required."""
        value = self.get(key, float) if default is None else self.get(key, float, default)
        if not abs(value) < 2**63 / 1_000_000:  # int64 nanoseconds
            raise ConfigError(f"{self.where}.{key} = {value!r} ms is out of range")
        return round(value * 1_000_000)

    def positive(self, key: str, default: Any = ...) -> int:
        value = self.get(key, int, default)
        if value <= 0:
            raise ConfigError(f"{self.where}.{key} = {value} must be positive")
        return int(value)

    def choice(self, key: str, choices: tuple[str, ...], default: Any = ...) -> str:
        value = self.get(key, str, default)
        if value not in choices:
            raise ConfigError(f"{self.where}.{key} = {value!r} is not one of {choices}")
        return str(value)

    def done(self) -> None:
        """Fail if the table holds keys nothing asked for, listing the allowed ones."""
        if self._data:
            raise ConfigError(f"{self.where}: unknown key(s) {sorted(self._data)}; allowed: "
                              f"{', '.join(sorted(self._known))}")
