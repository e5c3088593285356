"""Environment-variable defaults a service file can set: the endpoint and the log level."""

from __future__ import annotations

import os
import subprocess
import sys

import zmq


def _fusion_node(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fusion_node.cli", *args],
                          env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=60, check=False)


def _free_endpoint() -> str:
    context = zmq.Context.instance()
    socket = context.socket(zmq.PUB)
    port = socket.bind_to_random_port("tcp://127.0.0.1")
    socket.close(linger=0)
    return f"tcp://127.0.0.1:{port}"


def test_echo_listens_where_the_environment_says():
    endpoint = _free_endpoint()
    result = _fusion_node("echo", "pred.speech", "--timeout", "0.5",
                          FUSION_NODE_ENDPOINT=endpoint)
    assert result.returncode == 1
    assert endpoint in result.stderr  # the one line names where it listened
    flag = _fusion_node("echo", "pred.speech", "--timeout", "0.5", "--endpoint", endpoint,
                        FUSION_NODE_ENDPOINT="tcp://127.0.0.1:1")
    assert endpoint in flag.stderr  # the flag wins over the environment


def test_a_bad_log_level_from_the_environment_is_named():
    result = _fusion_node("echo", "pred.speech", "--timeout", "0.1",
                          FUSION_NODE_LOG_LEVEL="loud")
    assert result.returncode == 2
    assert "'loud' is not a log level" in result.stderr
    assert "FUSION_NODE_LOG_LEVEL" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_log_level_from_the_environment_applies():
    show_level = ("import logging, sys; from fusion_node.cli.main import main; "
                  "code = main(sys.argv[1:]); print(logging.getLevelName("
                  "logging.getLogger().level))")
    for env_level, flags, expected in (("warning", [], "WARNING"),
                                       ("warning", ["--log-level", "debug"], "DEBUG")):
        result = subprocess.run(
            [sys.executable, "-c", show_level, *flags, "echo", "pred.speech", "--timeout",
             "0.1", "--endpoint", _free_endpoint()],
            env={**os.environ, "FUSION_NODE_LOG_LEVEL": env_level}, capture_output=True,
            text=True, timeout=60, check=False)
        assert result.stdout.strip() == expected, (flags, result.stdout, result.stderr)
