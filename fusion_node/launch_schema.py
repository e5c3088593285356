"""The launch file's JSON Schema (draft 2020-12), read off the parser that checks launch files.

`fusion_node.config.parse_tables` runs on probes instead of data: a `Table` made from a probe
notes every key the parser asks for (its TOML type, default, choices, bounds and unit) and
answers with a made-up value, so the parser goes on. Where the parser branches on an answer
(one of a key's choices, an optional table given or not, a list or a map with an element or
none) it is run again for each answer, so every shape a table takes is seen; each shape the
parser accepted up to the table's `done()` is a variant of that table in the schema. Nothing
here names a key: a key added to the parser is in the schema, and the test that compares the
schema with launch/launch.schema.json says it must be regenerated.

Checks the parser makes in plain code (across keys or tables, the items of lists, a spec's
roles) are not in the schema; `fusion-node check --config FILE` runs them all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import json
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from fusion_node.errors import ConfigError
from fusion_node.tables import Probe, Table

SCHEMA_PATH = "launch/launch.schema.json"
REGENERATE = f"fusion-node check --launch-schema --out {SCHEMA_PATH} --force"

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean",
               dict: "object", list: "array"}
# Answers to required keys: plausible enough for the checks that follow them (4096 audio
# samples make log-mel frames, a duration of 1 ms is in range).
_MADE_UP: dict[type, Any] = {str: "probe", int: 4096, float: 1.0, bool: False}
_UNITS = {"_ms": "milliseconds", "_s": "seconds"}

Path = tuple[str, ...]  # where a table is: ("engines", "[]", "spec", "inputs", "*")
ForkId = tuple[Any, ...]
# Answers to "is this optional table given?"; other answers are a key's choices.
_GIVEN, _ABSENT = frozenset({True}), frozenset({False})


@dataclass(frozen=True)
class _Rule:
    """One `Table.get` call: the key's TOML types and its default (`...`: required)."""

    kinds: tuple[type, ...]
    default: Any
    unit: str | None = None

    @property
    def required(self) -> bool:
        return self.default is ...


@dataclass
class _Variant:
    """A table as the parser read it on one path through its branches. `answers` are the
    answers it branched on: choices (str) or whether an optional table was given (bool)."""

    rules: dict[str, _Rule]
    answers: dict[str, frozenset[Any]] = field(default_factory=dict)

    def allowed(self) -> list[str]:
        return [key for key, rule in self.rules.items() if self.answers.get(key) != _ABSENT]

    def required(self) -> list[str]:
        return [key for key in self.allowed() if self._required(key)]

    def _required(self, key: str) -> bool:
        rule, answers = self.rules[key], self.answers.get(key)
        if rule.required or answers == _GIVEN:
            return True
        # A choice whose default the parser did not accept here must be given.
        return answers is not None and not _is_presence(answers) and rule.default not in answers


class _Explorer:
    """Runs the parser once per answer at each branch. A table's own branches are explored in
    every combination; another table's once, in the first run that reaches them."""

    def __init__(self) -> None:
        self.variants: dict[Path, list[_Variant]] = {}
        self.choices: dict[tuple[Path, str], list[Any]] = {}
        self.bounds: dict[tuple[Path, str], dict[str, float]] = {}
        self._plans: list[dict[ForkId, int]] = [{}]
        self._seen: set[ForkId] = set()
        self._plan: dict[ForkId, int] = {}
        self._taken: dict[ForkId, int] = {}

    def explore(self, parse: Callable[[Probe], Any]) -> None:
        while self._plans:
            self._plan, self._taken = self._plans.pop(0), {}
            # A later check may refuse a made-up answer: the tables done by then count.
            with contextlib.suppress(ConfigError):
                parse(_TableProbe(self, ()))

    def answer(self, fork: ForkId, count: int) -> int:
        """Which of `count` answers this run gives at `fork`; the others get runs of their
        own, which replay this run's answers up to here."""
        index = self._plan.get(fork, 0)
        if fork not in self._plan and fork not in self._seen:
            self._seen.add(fork)
            self._plans.extend({**self._taken, fork: i} for i in range(1, count))
        self._taken[fork] = index
        return index

    def note_choices(self, path: Path, key: str, choices: tuple[Any, ...]) -> None:
        known = self.choices.setdefault((path, key), [])
        known.extend(c for c in choices if c not in known)

    def note_bounds(self, path: Path, key: str, bounds: dict[str, float | None]) -> None:
        known = self.bounds.setdefault((path, key), {})
        for name, value in bounds.items():
            if value is not None:
                tighter = max if name in ("minimum", "exclusiveMinimum") else min
                known[name] = tighter(known.get(name, value), value)

    def done(self, path: Path, variant: _Variant) -> None:
        variants = self.variants.setdefault(path, [])
        if variant not in variants:
            variants.append(variant)


class _RecordingTable(Table):
    """What `Table(probe, where)` makes: it notes each question the parser asks and answers
    it, branching where the answer decides what the parser reads next."""

    def __init__(self, data: _TableProbe, where: str) -> None:
        self.where = where
        self._explorer = data.explorer
        self._path = data.path
        self._rules: dict[str, _Rule] = {}
        self._answers: dict[str, frozenset[Any]] = {}
        self._taken: tuple[tuple[str, int], ...] = ()  # this table's answers so far
        self._done = False

    def _fork(self, key: str, count: int) -> int:
        index = self._explorer.answer((self._path, self._taken, key), count)
        self._taken += ((key, index),)
        return index

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        kinds = kind if isinstance(kind, tuple) else (kind,)
        self._rules[key] = _Rule(kinds, default)
        if default is ...:
            return self._made_up(key, kinds[0])
        if dict not in kinds and list not in kinds:
            return default
        # Given, a table or list is probed for what its items are; absent, it is the default.
        given = self._fork(key, 2) == 1
        if dict in kinds:  # a table given can change what else the parser asks (a spec)
            self._answers[key] = frozenset({given})
        return self._made_up(key, dict if dict in kinds else list) if given else default

    def _made_up(self, key: str, kind: type) -> Any:
        if kind is dict:
            return _TableProbe(self._explorer, (*self._path, key))
        if kind is list:
            return [_TableProbe(self._explorer, (*self._path, key, "[]"))]
        return _MADE_UP[kind]

    def ms(self, key: str, default: float | None = None) -> int:
        nanoseconds = super().ms(key, default)
        self._rules[key] = replace(self._rules[key], unit=_UNITS["_ms"])
        return nanoseconds

    def one_of(self, key: str, value: Any, choices: tuple[Any, ...], message: str) -> Any:
        self._explorer.note_choices(self._path, key, choices)
        if self._done:  # a check after done(): the table's shape no longer depends on it
            return value
        ordered = sorted(choices, key=lambda choice: choice != value)  # the parser's first
        answer = ordered[self._fork(key, len(ordered))]
        self._answers[key] = frozenset({answer})
        return answer

    def in_range(self, key: str, value: float | None, message: str, *,
                 minimum: float | None = None, exclusive_minimum: float | None = None,
                 exclusive_maximum: float | None = None) -> None:
        self._explorer.note_bounds(self._path, key, {
            "minimum": minimum, "exclusiveMinimum": exclusive_minimum,
            "exclusiveMaximum": exclusive_maximum})

    def done(self) -> None:
        self._done = True
        self._explorer.done(self._path, _Variant(dict(self._rules), dict(self._answers)))


class _TableProbe(Probe, Mapping[str, Any]):
    """A table's data as the parser sees it: `Table` makes a `_RecordingTable` of it; code
    that iterates it (a spec's inputs) finds one entry, or none, each in a run of its own."""

    table_class = _RecordingTable

    def __init__(self, explorer: _Explorer, path: Path) -> None:
        self.explorer = explorer
        self.path = path
        self._entries: dict[str, Any] | None = None

    def _items(self) -> dict[str, Any]:
        if self._entries is None:
            one = self.explorer.answer((self.path, None), 2) == 1
            self._entries = {"*": _TableProbe(self.explorer, (*self.path, "*"))} if one else {}
        return self._entries

    def __getitem__(self, key: str) -> Any:
        return self._items()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())


def _merged(variants: list[_Variant]) -> list[_Variant]:
    """Fewest variants that accept the same tables: two that differ in one answer only are
    one with both answers, and one that accepts a subset of another is dropped."""
    merged = list(variants)
    changed = True
    while changed:
        changed = False
        for a in merged:
            for b in merged:
                if a is b or a.rules != b.rules or a.answers.keys() != b.answers.keys():
                    continue
                differ = [key for key in a.answers if a.answers[key] != b.answers[key]]
                if all(a.answers[key] <= b.answers[key] for key in differ):
                    merged.remove(a)
                elif len(differ) == 1:
                    key = differ[0]
                    merged[merged.index(a)] = _Variant(
                        a.rules, {**a.answers, key: a.answers[key] | b.answers[key]})
                    merged.remove(b)
                else:
                    continue
                changed = True
                break
            if changed:
                break
    return merged


class _SchemaBuilder:
    def __init__(self, explorer: _Explorer) -> None:
        self._explorer = explorer

    def table(self, path: Path) -> dict[str, Any]:
        variants = _merged(self._explorer.variants[path])
        allowed = {key for v in variants for key in v.allowed()}
        # In the order the parser reads them, which is the order the code lists them.
        keys = [key for key in dict.fromkeys(k for v in variants for k in v.rules)
                if key in allowed]
        required = [key for key in keys if all(key in v.required() for v in variants)]
        schema: dict[str, Any] = {"type": "object", "properties": {
            key: self._key(path, key, variants) for key in keys}}
        if required:
            schema["required"] = required
        schema["additionalProperties"] = False  # Table.done() refuses keys nobody asked for
        branches = self._split(path, variants, keys, required, frozenset())
        if path == ("drivers", "[]"):
            branches.extend(_driver_configs())
        if branches:
            schema["allOf"] = branches
        return schema

    def _key(self, path: Path, key: str, variants: list[_Variant]) -> dict[str, Any]:
        rules = [v.rules[key] for v in variants if key in v.allowed()]
        kinds = rules[0].kinds
        if any(rule.kinds != kinds for rule in rules):
            raise ValueError(f"{path} {key}: read as {sorted({r.kinds for r in rules})}")
        names = [_JSON_TYPES[kind] for kind in kinds]
        schema: dict[str, Any] = {"type": names[0] if len(names) == 1 else names}
        notes = []
        unit = rules[0].unit or _unit(key)
        if unit:
            notes.append(f"in {unit}")
        defaults = [(v, v.rules[key].default) for v in variants if key in v.allowed()
                    and not v.rules[key].required]
        if len(defaults) == len(rules) and len({json.dumps(d) for _, d in defaults}) == 1:
            if defaults[0][1] is not None:
                schema["default"] = defaults[0][1]
        else:
            notes.extend(f"default {json.dumps(d)} where {self._where(v, key)}"
                         for v, d in defaults if d is not None)
        if (path, key) in self._explorer.choices:
            schema["enum"] = list(self._explorer.choices[path, key])
        schema.update(_tightest(self._explorer.bounds.get((path, key), {})))
        child = (*path, key)
        if dict in kinds and child in self._explorer.variants:
            schema.update({k: v for k, v in self.table(child).items() if k != "type"})
        elif dict in kinds and (*child, "*") in self._explorer.variants:
            schema["additionalProperties"] = self.table((*child, "*"))
        if list in kinds and (*child, "[]") in self._explorer.variants:
            schema["items"] = self.table((*child, "[]"))
        if notes:
            schema["description"] = "; ".join(notes)
        return schema

    def _where(self, variant: _Variant, key: str) -> str:
        said = []
        for other, answers in variant.answers.items():
            if other == key or answers == _GIVEN | _ABSENT:
                continue
            if answers == _GIVEN:
                said.append(f"{other} is given")
            elif answers == _ABSENT:
                said.append(f"{other} is not given")
            else:
                said.append(f"{other} is {' or '.join(sorted(answers))}")
        return " and ".join(said)

    def _ordered(self, path: Path, key: str, answers: frozenset[Any]) -> list[Any]:
        choices = self._explorer.choices.get((path, key)) or sorted(answers)
        return [c for c in choices if c in answers]

    def _split(self, path: Path, variants: list[_Variant], keys: list[str],
               required: list[str], pinned: frozenset[str]) -> list[dict[str, Any]]:
        """What each variant asks beyond the table's common schema: as `if`/`then` on an
        answer that tells the variants apart (so an editor names the key at fault), else as
        `anyOf`. `pinned`: keys the enclosing `if`s already decide."""
        if len(variants) == 1:
            constraint = self._variant(path, variants[0], keys, required, pinned)
            return [constraint] if constraint else []
        for key in variants[0].answers:
            groups: dict[frozenset[Any], list[_Variant]] = {}
            for variant in variants:
                if key in variant.answers:
                    groups.setdefault(variant.answers[key], []).append(variant)
            answers = list(groups)
            if (sum(map(len, groups.values())) < len(variants) or len(groups) < 2
                    or any(a & b for a in answers for b in answers if a is not b)):
                continue
            branches = []
            for answer, group in groups.items():
                then = self._split(path, group, keys, required, pinned | {key})
                if then:
                    branches.append({"if": self._condition(path, key, group[0], answer),
                                     "then": then[0] if len(then) == 1 else {"allOf": then}})
            return branches
        options = [self._variant(path, v, keys, required, pinned) for v in variants]
        return [{"anyOf": options}] if all(options) else []

    def _condition(self, path: Path, key: str, variant: _Variant, answers: frozenset[Any]
                   ) -> dict[str, Any]:
        if answers == _GIVEN:
            return {"required": [key]}
        if answers == _ABSENT:
            return {"not": {"required": [key]}}
        condition: dict[str, Any] = {
            "properties": {key: _enum(self._ordered(path, key, answers))}}
        if key in variant.required():  # absent, the key is its default, which is not here
            condition["required"] = [key]
        return condition

    def _variant(self, path: Path, variant: _Variant, keys: list[str], required: list[str],
                 pinned: frozenset[str]) -> dict[str, Any]:
        allowed = variant.allowed()
        narrowed = {}
        for key, answers in variant.answers.items():
            if key in allowed and key not in pinned and not _is_presence(answers):
                values = self._ordered(path, key, answers)
                if values != self._explorer.choices.get((path, key)):
                    narrowed[key] = _enum(values)
        forbidden = [key for key in keys if key not in allowed]
        schema: dict[str, Any] = {}
        if len(forbidden) > len(allowed):  # fewer words to list what is allowed
            schema["properties"] = {key: narrowed.get(key, True) for key in allowed}
            schema["additionalProperties"] = False
        elif narrowed or forbidden:
            schema["properties"] = {key: narrowed.get(key, False) for key in keys
                                    if key in narrowed or key in forbidden}
        own = [key for key in variant.required() if key not in required and key not in pinned]
        if own:
            schema["required"] = own
        return schema


def _is_presence(answers: frozenset[Any]) -> bool:
    return any(isinstance(answer, bool) for answer in answers)


def _enum(values: list[Any]) -> dict[str, Any]:
    return {"const": values[0]} if len(values) == 1 else {"enum": values}


def _unit(key: str) -> str | None:
    return next((unit for suffix, unit in _UNITS.items() if key.endswith(suffix)), None)


def _tightest(bounds: dict[str, float]) -> dict[str, float]:
    """Bounds without those another makes redundant (ms's int64 range under `>= 0`)."""
    bounds = dict(bounds)
    if "minimum" in bounds and "exclusiveMinimum" in bounds:
        del bounds["exclusiveMinimum" if bounds["minimum"] > bounds["exclusiveMinimum"]
                   else "minimum"]
    return bounds


def _driver_configs() -> list[dict[str, Any]]:
    """A driver's `config` table is checked by `drivers.registry` against the dataclass of
    the driver's kind: its fields, their type hints and defaults (registry.parse_config)."""
    from drivers.registry import _KINDS  # the registry's own kind -> config dataclass

    branches = []
    for kind, (module_name, _, class_name) in _KINDS.items():
        config = _config_class(getattr(importlib.import_module(module_name), class_name))
        then: dict[str, Any] = {"properties": {"config": config}}
        if config.get("required"):  # the default, an empty table, lacks them
            then["required"] = ["config"]
        branches.append({"if": {"properties": {"kind": {"const": kind}}, "required": ["kind"]},
                         "then": then})
    return branches


def _config_class(config_class: type) -> dict[str, Any]:
    hints = typing.get_type_hints(config_class)
    properties: dict[str, Any] = {}
    required = []
    for item in dataclasses.fields(config_class):
        if item.name == "stream":  # given by the driver's `stream`, refused in config
            continue
        properties[item.name] = {"type": _hint_types(hints[item.name])}
        if item.default is not dataclasses.MISSING and item.default is not None:
            properties[item.name]["default"] = item.default
        elif (item.default is dataclasses.MISSING
              and item.default_factory is dataclasses.MISSING):
            required.append(item.name)
        unit = _unit(item.name)
        if unit:
            properties[item.name]["description"] = f"in {unit}"
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    description = inspect.getdoc(config_class)
    if description:
        schema["description"] = description
    if required:
        schema["required"] = required
    schema["additionalProperties"] = False
    return schema


def _hint_types(hint: Any) -> str | list[str]:
    """registry._matches as JSON types: a float takes an int, a bool is never a number, and
    None (TOML has no null) is the key left out."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        names = []
        for arg in typing.get_args(hint):
            if arg is not type(None):
                named = _hint_types(arg)
                names.extend(named if isinstance(named, list) else [named])
        return names[0] if len(names) == 1 else names
    return _JSON_TYPES[hint]


def launch_schema() -> dict[str, Any]:
    """The JSON Schema of launch files, from `fusion_node.config.parse_tables`."""
    from fusion_node.config import parse_tables

    explorer = _Explorer()
    explorer.explore(lambda probe: parse_tables(probe, "launch file"))
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "fusion-node launch file",
        "description": (
            f"Generated from the launch-file parser (fusion_node/config.py) by `{REGENERATE}`;"
            " do not edit. The parser also checks what this schema does not say (names "
            "across tables, values that depend on other keys, the items of lists): "
            "`fusion-node check --config FILE` runs every check."),
        **_SchemaBuilder(explorer).table(()),
    }


def launch_schema_text() -> str:
    """The schema as launch/launch.schema.json holds it, and as the CLI prints it."""
    return json.dumps(launch_schema(), indent=2) + "\n"
