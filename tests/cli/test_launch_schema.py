"""launch/launch.schema.json: generated from the launch-file parser, so it accepts what the
parser accepts and refuses, at the same key, what the parser refuses key by key."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from fusion_node.config import parse_config
from fusion_node.errors import ConfigError
from fusion_node.launch_schema import REGENERATE, SCHEMA_PATH, launch_schema, launch_schema_text

REPO = Path(__file__).resolve().parents[2]
LAUNCH_FILES = [*sorted((REPO / "launch").glob("*.toml")), REPO / "fusion_node" / "default.toml"]


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = launch_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _errors(validator: jsonschema.Draft202012Validator, data: Any
            ) -> list[tuple[tuple[Any, ...], str]]:
    """(key path, message) of every error, those inside `anyOf` too."""
    found = []
    pending = list(validator.iter_errors(data))
    while pending:
        error = pending.pop()
        found.append((tuple(error.absolute_path), error.message))
        pending.extend(error.context or [])
    return found


def _toml(value: Any) -> str:
    """TOML for launch-file data, tables inline (enough for these tests' values)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else json.dumps(value)


def _document(data: dict[str, Any]) -> str:
    return "".join(f"{json.dumps(key)} = {_toml(value)}\n" for key, value in data.items())


def _load(name: str) -> dict[str, Any]:
    return tomllib.loads((REPO / "launch" / name).read_text())


def test_the_published_schema_is_what_the_parser_generates():
    published = (REPO / SCHEMA_PATH).read_text()
    assert published == launch_schema_text(), (
        f"{SCHEMA_PATH} is stale: regenerate it with `.venv/bin/{REGENERATE}`")


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=lambda p: p.name)
def test_every_shipped_launch_file_validates(validator, path):
    assert _errors(validator, tomllib.loads(path.read_text())) == []


def _vad_input(table: dict[str, Any]) -> dict[str, Any]:
    data = _load("vad.toml")
    data["engines"][0]["spec"]["inputs"]["input"] = table
    return data


# Each a real mistake: (launch data, the key path both must name, words of the parser's error)
MISTAKES = {
    "unknown key in an engine": (
        lambda d: d["engines"][1].update(latncy_ms=40), ("engines", 1), "latncy_ms"),
    "a string for rate_hz": (
        lambda d: d["engines"][0].update(rate_hz="30"), ("engines", 0, "rate_hz"), "rate_hz"),
    "a backend not in the choices": (
        lambda d: d["engines"][0].update(backend="cuda"), ("engines", 0, "backend"), "cuda"),
    "a missing required key": (
        lambda d: d["engines"][0].pop("topic"), ("engines", 0), "topic"),
    "a negative rate_hz": (
        lambda d: d["engines"][0].update(rate_hz=-30), ("engines", 0, "rate_hz"), "rate_hz"),
    "a driver config key its kind lacks": (
        lambda d: d["drivers"][0]["config"].update(fsp=30), ("drivers", 0, "config"), "fsp"),
    "a stream kind not in the choices": (
        lambda d: d["streams"][0].update(kind="video"), ("streams", 0, "kind"), "video"),
    "a record table without its path": (
        lambda d: d.update(record={"topics": ["pred."]}), ("record",), "path"),
}
INPUT = ("engines", 0, "spec", "inputs", "input")
SPEC_MISTAKES = {
    # The keys a spec input allows depend on its kind and transform.
    "a log-mel key on a waveform input": (
        {"kind": "audio", "stream": "audio", "samples": 576, "sample_rate": 16000,
         "n_mels": 40}, INPUT, "n_mels"),
    "an image key on an audio input": (
        {"kind": "audio", "stream": "audio", "samples": 576, "sample_rate": 16000,
         "size": 96}, INPUT, "size"),
    "an audio input without its samples": (
        {"kind": "audio", "stream": "audio", "sample_rate": 16000}, INPUT, "samples"),
    "a transform not in the choices": (
        {"kind": "audio", "stream": "audio", "samples": 576, "sample_rate": 16000,
         "transform": "mfcc"}, (*INPUT, "transform"), "mfcc"),
}


@pytest.mark.parametrize("mistake", [*MISTAKES, *SPEC_MISTAKES])
def test_the_schema_refuses_at_the_same_key_what_the_parser_refuses(validator, mistake):
    if mistake in MISTAKES:
        change, where, words = MISTAKES[mistake]
        data = _load("sim.toml")
        change(data)
    else:
        table, where, words = SPEC_MISTAKES[mistake]
        data = _vad_input(table)
    with pytest.raises(ConfigError, match=words):
        parse_config(_document(data), "mistake.toml")
    errors = _errors(validator, data)
    assert any(path == where and (words in message or words == path[-1])
               for path, message in errors), errors


def test_a_spec_engine_takes_no_builtin_binding(validator):
    data = _load("vad.toml")
    data["engines"][0]["binding"] = "speech"
    with pytest.raises(ConfigError, match="give either `spec`"):
        parse_config(_document(data), "mistake.toml")
    assert ("engines", 0, "binding") in [path for path, _ in _errors(validator, data)]


ACCEPTED = {
    "a log-mel input": _vad_input({"kind": "audio", "stream": "audio", "samples": 576,
                                   "sample_rate": 16000, "transform": "log_mel",
                                   "n_mels": 32}),
    "a record table": {**_load("sim.toml"), "record": {
        "path": "out.mcap", "topics": ["pred."], "duration_s": 2.5, "compression": "zstd",
        "preview_hz": 0, "chunk_size_kb": 256, "flush_interval_ms": 500, "overwrite": True}},
    "every node key": {**_load("sim.toml"), "node": {
        "pub": "tcp://127.0.0.1:5599", "health_period_ms": 500, "startup_timeout_ms": 1,
        "driver_max_restarts": 0, "driver_restart_backoff_ms": 10,
        "driver_restart_backoff_max_ms": 20.5, "max_future_ms": 0, "connect": []}},
}


@pytest.mark.parametrize("name", ACCEPTED)
def test_what_the_parser_accepts_validates(validator, name):
    parse_config(_document(ACCEPTED[name]), f"{name}.toml")
    assert _errors(validator, ACCEPTED[name]) == []


def _mutations(data: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """(path, value) for each key of `data` left out (value ...) or set to another kind."""
    items = data.items() if isinstance(data, dict) else enumerate(data)
    for key, value in items:
        if isinstance(data, dict):
            yield (*path, key), ...
            for other in ("x", 7, 0.5, -1, True, ["x"], {}):
                yield (*path, key), other
        if isinstance(value, (dict, list)):
            yield from _mutations(value, (*path, key))


@pytest.mark.parametrize("name", ["sim.toml", "vad.toml", "robot-example.toml"])
def test_the_schema_is_never_stricter_than_the_parser(validator, name):
    """Every key of a launch file left out or given another kind of value: whatever the
    parser accepts, the schema accepts (it refuses less: checks across keys are the
    parser's alone)."""
    base = _load(name)
    accepted = 0
    for path, value in _mutations(base):
        # Table.get lets a bool through where a key takes several kinds, one of them a
        # number (a spec constant's `value`); the schema keeps to one bool type.
        if value is True and path[-1] == "value":
            continue
        data = copy.deepcopy(base)
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        if value is ...:
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
        try:
            parse_config(_document(data), name)
        except ConfigError:
            continue
        accepted += 1
        assert _errors(validator, data) == [], (path, value)
    assert accepted > 20  # the mutations reach what the parser accepts, not only mistakes


def _fusion_node(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fusion_node.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)


def test_the_command_prints_the_schema_and_never_overwrites_without_force(tmp_path):
    printed = _fusion_node("check", "--launch-schema")
    assert printed.returncode == 0, printed.stderr
    assert json.loads(printed.stdout) == launch_schema()
    assert printed.stdout == launch_schema_text()  # the text --out writes

    out = tmp_path / "launch.schema.json"
    out.write_text("mine\n")
    refused = _fusion_node("check", "--launch-schema", "--out", str(out))
    assert refused.returncode == 1
    assert len(refused.stderr.strip().splitlines()) == 1
    assert str(out) in refused.stderr and "--force" in refused.stderr
    assert out.read_text() == "mine\n"

    forced = _fusion_node("check", "--launch-schema", "--out", str(out), "--force")
    assert forced.returncode == 0, forced.stderr
    assert out.read_text() == launch_schema_text()
