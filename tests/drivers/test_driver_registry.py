"""create_driver: every kind builds, and bad launch-file input is a ConfigError naming it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from drivers.registry import KINDS, create_driver
from fusion_node.clock import MonotonicClock
from fusion_node.errors import ConfigError

VALID = {
    "camera": ({"source": "clip.avi", "realtime": False, "loop": True}, "OpenCVCamera"),
    "microphone": ({"device": None, "sample_rate": 48000, "delay_ms": 2}, "SoundDeviceMicrophone"),
    "wav": ({"path": "speech.wav", "chunk_ms": 20}, "WavFileMicrophone"),
    "joints_zmq": ({"endpoint": "ipc:///tmp/arm", "timeout_ms": 500}, "ZmqJointSubscriber"),
    "sim_camera": ({"fps": 15}, "SimulatedCamera"),
    "sim_microphone": ({"seed": 3}, "SimulatedMicrophone"),
    "sim_joints": ({}, "SimulatedJoints"),
    "sim_arm": ({"camera_fps": 10, "layout_seed": 4}, "SimulatedArm"),
    "ros2": ({"topic": "/camera/front/image_raw", "type": "sensor_msgs/msg/Image",
              "domain_id": 7}, "Ros2Subscriber"),
}


def test_every_kind_is_covered():
    assert set(VALID) == set(KINDS)


@pytest.mark.parametrize("kind", sorted(VALID))
def test_creates_each_kind(kind):
    config, class_name = VALID[kind]
    driver = create_driver(kind, "sensor.front", config, MonotonicClock())
    assert type(driver).__name__ == class_name
    assert driver.stream == "sensor.front"


@pytest.mark.parametrize("kind, stream, config, match", [
    ("lidar", "lidar.top", {}, "kind 'lidar'"),
    ("sim_camera", "camera.sim", [("fps", 30)], "expected a table"),
    ("sim_camera", "Camera Front", {}, "stream name 'Camera Front'"),
    ("sim_camera", "camera.sim", {"fsp": 30}, "unknown config key 'fsp'"),
    ("sim_camera", "camera.sim", {"stream": "x"}, "'stream' is not allowed"),
    ("sim_camera", "camera.sim", {"fps": "30"}, "'fps' is '30', expected float"),
    ("sim_camera", "camera.sim", {"fps": True}, "'fps' is True"),
    ("sim_camera", "camera.sim", {"fps": -1}, "fps is -1"),
    ("camera", "camera.front", {}, "missing config key 'source'"),
    ("camera", "camera.front", {"source": 1.5}, "'source' is 1.5, expected int or str"),
    ("camera", "camera.front", {"source": "a.avi", "loop": 1}, "'loop' is 1, expected bool"),
    ("wav", "audio.file", {"path": "a.wav", "chunk_ms": 0}, "chunk_ms is 0"),
    ("sim_microphone", "audio.sim", {"seed": 1.0}, "'seed' is 1.0, expected int or null"),
    ("microphone", "audio.mic", {"sample_rate": 16000.0}, "'sample_rate' is 16000.0"),
    ("ros2", "camera.ros", {"topic": "/cam", "type": "sensor_msgs/msg/Imu"},
     "type 'sensor_msgs/msg/Imu' is not one of"),
    ("ros2", "camera.ros", {"topic": "cam/image", "type": "sensor_msgs/msg/Image"},
     "'cam/image' must be absolute"),
    ("ros2", "camera.ros", {"topic": "/cam", "type": "sensor_msgs/msg/Image", "domain_id": 300},
     "domain_id 300 must be an integer from 0 to 232"),
    ("ros2", "camera.ros", {"topic": "/cam", "type": "sensor_msgs/msg/Image",
                            "stamp_clock": "gps"}, "stamp_clock 'gps' is not one of"),
])
def test_bad_input_is_a_config_error_naming_it(kind, stream, config, match):
    with pytest.raises(ConfigError, match=match):
        create_driver(kind, stream, config, MonotonicClock())


def test_importing_registry_loads_no_device_libraries():
    code = ("import sys, drivers, drivers.registry, drivers.process; "
            "print(sorted({'cv2', 'sounddevice', 'cyclonedds'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
