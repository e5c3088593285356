"""A run that produced nothing does not exit 0: systemd and scripts must tell it from a good
run."""

from fusion_node.cli import main
from tests.conftest import ALWAYS_CRASHING

# The camera never comes; the node gives its start-up half a second, not the default 10 s.
NO_CAMERA = ALWAYS_CRASHING.replace("[node]\n", '[node]\npub = "tcp://127.0.0.1:*"\n'
                                    "startup_timeout_ms = 500\n", 1)


def last_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_a_run_whose_camera_never_came_fails_naming_what_is_missing(tmp_path, capsys):
    config = tmp_path / "no-camera.toml"
    config.write_text(NO_CAMERA)
    assert main(["--log-level", "ERROR", "run", "--config", str(config), "--duration",
                 "3"]) == 1
    line = last_line(capsys)
    assert line.startswith(f"fusion-node: error: the run did not produce what {config} asks")
    assert line.endswith("asks for: stream camera.front never sent a sample")
    # (Both engines went on with the camera masked: only the stream is named.)


def test_a_good_run_exits_0_with_what_it_published(capsys):
    assert main(["--log-level", "ERROR", "run", "--pub", "tcp://127.0.0.1:*", "--duration",
                 "3"]) == 0
    line = last_line(capsys)
    assert line.startswith("fusion-node: published pred.speech ") and "deadline misses" in line


def test_version(capsys):
    import pytest

    from fusion_node import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"fusion-node {__version__}\n"


def test_a_stop_during_start_up_is_not_lost(tmp_path):
    """Started as a script's background job (SIGINT ignored, as the shell does) and stopped
    within its first 0.2 s: it must stop, not run its full duration."""
    import shlex
    import signal
    import subprocess
    import sys
    import time

    # `trap "" INT` then exec: SIGINT ignored from the start, as a background job has it.
    command = (f'trap "" INT; exec {shlex.quote(sys.executable)} -c "import sys; '
               'from fusion_node.cli import main; sys.exit(main())" --log-level ERROR run '
               '--pub "tcp://127.0.0.1:*" --duration 120')
    process = subprocess.Popen(["sh", "-c", command], stderr=subprocess.PIPE, text=True)
    time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    try:
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    # It stopped before producing anything, and says so (a run that produced nothing).
    assert process.returncode == 1, err
    assert "the run did not produce" in err.strip().splitlines()[-1]


async def test_health_says_degraded_while_a_stream_is_missing_and_ok_when_all_came():
    from fusion_node.config import load_config, parse_config
    from tests.conftest import run_node

    def statuses(collector) -> list[dict]:
        return [m.stats for m in collector.on("node.health")]

    _, collector = await run_node(parse_config(NO_CAMERA, "no-camera"), 2.5)
    late = statuses(collector)[-1]
    assert late["status"] == "degraded"
    assert "stream camera.front never sent a sample" in late["problems"]
    _, collector = await run_node(load_config(), 3.0)
    assert statuses(collector)[-1]["status"] == "ok", statuses(collector)[-1]["problems"]
