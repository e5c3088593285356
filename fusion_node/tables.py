"""Reading TOML tables strictly: every key is used once, so a typo is an error, not a default.

Launch files and engine specs both read their tables through `Table`, so their errors look
alike: the table, the key, the bad value, and what is allowed. Every check of a key's type,
presence, choices or range goes through `get`, `one_of` or `in_range`, so the launch file's
JSON Schema is read off these calls (`fusion_node.launch_schema`), not written beside them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Self, cast

from fusion_node.errors import ConfigError


class Probe:
    """Stands in for a table's data while `fusion_node.launch_schema` runs the parsers: a
    `Table` made from it is a `table_class`, which notes what the parser asks instead of
    answering from data."""

    table_class: type[Table]


class Table:
    def __new__(cls, data: Any, where: str) -> Self:
        if cls is Table and isinstance(data, Probe):
            return cast(Self, super().__new__(data.table_class))
        return super().__new__(cls)

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
        limit = 2**63 / 1_000_000  # int64 nanoseconds
        self.in_range(key, value, f"{self.where}.{key} = {value!r} ms is out of range",
                      exclusive_minimum=-limit, exclusive_maximum=limit)
        return round(value * 1_000_000)

    def positive(self, key: str, default: Any = ...) -> int:
        value = self.get(key, int, default)
        self.in_range(key, value, f"{self.where}.{key} = {value} must be positive",
                      exclusive_minimum=0)
        return int(value)

    def choice(self, key: str, choices: tuple[str, ...], default: Any = ...) -> str:
        value = self.get(key, str, default)
        return str(self.one_of(key, value, choices,
                               f"{self.where}.{key} = {value!r} is not one of {choices}"))

    def one_of(self, key: str, value: Any, choices: tuple[Any, ...], message: str) -> Any:
        """`value` (read from `key`) if it is one of `choices`, else ConfigError(`message`).
        Parsers call it where their check belongs, after `done()` too."""
        if value not in choices:
            raise ConfigError(message)
        return value

    def in_range(self, key: str, value: float | None, message: str, *,
                 minimum: float | None = None, exclusive_minimum: float | None = None,
                 exclusive_maximum: float | None = None) -> None:
        """ConfigError(`message`) unless `value` (read from `key`, in its unit) is within the
        bounds; None, an absent optional key, passes."""
        if value is None:
            return
        if not ((minimum is None or value >= minimum)
                and (exclusive_minimum is None or value > exclusive_minimum)
                and (exclusive_maximum is None or value < exclusive_maximum)):
            raise ConfigError(message)

    def done(self) -> None:
        """Fail if the table holds keys nothing asked for, listing the allowed ones."""
        if self._data:
            raise ConfigError(f"{self.where}: unknown key(s) {sorted(self._data)}; allowed: "
                              f"{', '.join(sorted(self._known))}")
