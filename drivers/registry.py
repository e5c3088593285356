"""Create a driver from a launch file's `kind`, stream name and config table.

Driver modules are imported only when a driver of their kind is created, so naming a kind
never pulls in OpenCV or PortAudio for the others.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import types
import typing
from collections.abc import Mapping
from typing import Any

from drivers.base import Driver
from fusion_node.clock import Clock
from fusion_node.errors import ConfigError

# kind -> (module, driver class, config dataclass)
_KINDS: dict[str, tuple[str, str, str]] = {
    "camera": ("drivers.camera", "OpenCVCamera", "OpenCVCameraConfig"),
    "microphone": ("drivers.microphone", "SoundDeviceMicrophone",
                   "SoundDeviceMicrophoneConfig"),
    "wav": ("drivers.microphone", "WavFileMicrophone", "WavFileMicrophoneConfig"),
    "joints_zmq": ("drivers.joints", "ZmqJointSubscriber", "ZmqJointSubscriberConfig"),
    "sim_camera": ("drivers.sim.simulated", "SimulatedCamera", "SimulatedCameraConfig"),
    "sim_microphone": ("drivers.sim.simulated", "SimulatedMicrophone",
                       "SimulatedMicrophoneConfig"),
    "sim_joints": ("drivers.sim.simulated", "SimulatedJoints", "SimulatedJointsConfig"),
    "sim_arm": ("drivers.sim.arm_driver", "SimulatedArm", "SimulatedArmConfig"),
    "ros2": ("drivers.ros2", "Ros2Subscriber", "Ros2SubscriberConfig"),
}
KINDS = tuple(_KINDS)

_STREAM_NAME = re.compile(r"[a-z0-9_]+(\.[a-z0-9_]+)*")


def create_driver(kind: str, stream: str, config: Mapping[str, Any], clock: Clock) -> Driver:
    """Build the driver `kind` for `stream` from `config`; raise `ConfigError` naming any
    unknown kind, unknown, missing or ill-typed key, or bad value."""
    module, parsed = _parse(kind, stream, config)
    driver: Driver = getattr(module, _KINDS[kind][1])(parsed, clock)
    return driver


def check_driver_config(kind: str, stream: str, config: Mapping[str, Any]) -> None:
    """Validate a driver's config without opening its device (for launch-file checks)."""
    _parse(kind, stream, config)


def _parse(kind: str, stream: str, config: Mapping[str, Any]) -> tuple[types.ModuleType, Any]:
    if kind not in _KINDS:
        raise ConfigError(f"driver kind {kind!r} for stream {stream!r} is not one of "
                          f"{', '.join(KINDS)}")
    if not isinstance(stream, str) or not _STREAM_NAME.fullmatch(stream):
        raise ConfigError(f"stream name {stream!r} must be dotted lowercase, e.g. "
                          "'camera.front'")
    if not isinstance(config, Mapping):
        raise ConfigError(f"config for stream {stream!r} is {config!r}, expected a table")
    module_name, _, config_name = _KINDS[kind]
    module = importlib.import_module(module_name)
    parsed = parse_config(getattr(module, config_name), stream, config,
                          where=f"{kind} driver for stream {stream!r}")
    return module, parsed


def parse_config(cls: type, stream: str, config: Mapping[str, Any], where: str) -> Any:
    """Instantiate config dataclass `cls` for `stream`, checking every key and its type."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key, value in config.items():
        if key == "stream":
            raise ConfigError(f"{where}: config key 'stream' is not allowed; the stream "
                              "name is given separately")
        if key not in fields:
            known = ", ".join(name for name in fields if name != "stream")
            raise ConfigError(f"{where}: unknown config key {key!r} (known: {known})")
        if not _matches(value, hints[key]):
            raise ConfigError(f"{where}: config key {key!r} is {value!r}, expected "
                              f"{_type_name(hints[key])}")
    for name, field in fields.items():
        if (name != "stream" and name not in config
                and field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING):
            raise ConfigError(f"{where}: missing config key {name!r}")
    return cls(stream=stream, **config)


def _matches(value: Any, hint: Any) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):  # a flag is never a number
        return False
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
    return "null" if hint is type(None) else hint.__name__
