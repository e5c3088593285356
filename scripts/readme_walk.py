"""A new user's walk through README.md: every command it shows, in order, on a fresh clone.

    .venv/bin/python scripts/readme_walk.py            # about 15 minutes
    .venv/bin/python scripts/readme_walk.py --list     # the commands and how each is judged

Each command runs in a clone of this checkout (its .venv linked in), as the README writes
it. A command is judged as a user would judge it:
  - no traceback, ever;
  - one that succeeds exits 0; one that needs hardware this machine lacks (a robot, a
    camera, a clap recording, a GPU) exits 1 with one line saying what is missing;
  - one that runs until Ctrl-C (or longer than a walk can wait) gets SIGINT and must stop
    cleanly;
  - one that writes a file, run again, refuses to overwrite it (exit 1, one line).
Commands "from another terminal" run while a node runs in the background. The set-up before
`&&` is skipped (this checkout's .venv stands for it) unless --setup is given, and so is the
test suite (CI runs it).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKGROUND_NODE = ".venv/bin/fusion-node run --quiet"
# The README's ROS 2 example: a simulated ROS 2 robot, and the node fed from it.
ROS2_ROBOT = ".venv/bin/python -m fusion_node.ros2.dds sim-robot"
ROS2_NODE = ".venv/bin/fusion-node run --quiet --config launch/ros2.toml"


@dataclass(frozen=True)
class Policy:
    """How one README command is run and judged."""

    expect: str  # "ok", "one-line error", "interrupted" or "skip"
    why: str = ""
    interrupt_after_s: float | None = None  # SIGINT after this long
    # What must be running meanwhile (the README's "another terminal"), started in order.
    background: tuple[str, ...] = ()
    writes: str | None = None  # a file it writes: run again, it must refuse


# First match wins: (regular expression on the command, policy).
POLICIES: list[tuple[str, Policy]] = [
    (r"^\.venv/bin/python -m pytest", Policy("skip", "the test suite: CI runs it")),
    (r"fusion-node echo ", Policy("ok", background=(BACKGROUND_NODE,))),
    # `check` asks whether the optional parts the launch file uses load (PortAudio, OpenCV),
    # not whether the devices are plugged in.
    (r"fusion-node check --config launch/robot-example\.toml", Policy("ok")),
    (r"fusion-node launch launch/robot-example\.toml",
     Policy("one-line error", "no robot: the drivers fail, nothing is published",
            interrupt_after_s=120)),
    (r"fusion-node top", Policy("interrupted", "a live table until Ctrl-C",
                                interrupt_after_s=5, background=(BACKGROUND_NODE,))),
    (r"engine build speech --backend tensorrt",
     Policy("one-line error", "no TensorRT on this machine")),
    (r"python -m training\.train_", Policy("interrupted", "training takes an hour or more",
                                           interrupt_after_s=60)),
    (r"fusion-node eval speech", Policy("interrupted", "about 15 minutes",
                                        interrupt_after_s=60)),
    (r"fusion-node eval action", Policy("interrupted", "minutes", interrupt_after_s=60)),
    (r"fusion-node record pred\.mcap --endpoint",
     Policy("interrupted", "records until Ctrl-C", interrupt_after_s=8, background=(BACKGROUND_NODE,),
            writes="pred.mcap")),
    (r"fusion-node record run\.mcap", Policy("ok", writes="run.mcap")),
    (r"fusion-node run --config launch/ros2\.toml", Policy("ok", background=(ROS2_ROBOT,))),
    (r"fusion_node\.ros2\.dds echo ", Policy("ok", interrupt_after_s=60,
                                             background=(ROS2_ROBOT, ROS2_NODE))),
    (r"--ros2 sample_bag", Policy("ok", writes="sample_bag")),
    (r"replay sample_bag .*--out bag_pred\.mcap", Policy("ok", writes="bag_pred.mcap")),
    (r"fusion-node run --record run\.mcap",
     Policy("one-line error", "run.mcap exists: the line before wrote it")),
    (r"fusion-node run ", Policy("ok")),
    (r"fusion-node calibrate camera shots/",
     Policy("one-line error", "no checkerboard shots/ folder")),
    (r"fusion-node calibrate av-offset clap\.mcap",
     Policy("one-line error", "no clap.mcap recording")),
    (r"fusion-node calibrate clock tcp://mcu",
     Policy("one-line error", "no microcontroller answers", interrupt_after_s=60)),
    (r"fusion-node bench (soak|fuzz)", Policy("interrupted", "tens of minutes",
                                              interrupt_after_s=60)),
    (r"fusion-node bench ", Policy("ok", interrupt_after_s=240)),
    (r"--save sample\.rrd", Policy("ok", writes="sample.rrd")),
    (r"fusion-node view tests/data/sample\.mcap$",
     Policy("one-line error", "no display for the Rerun viewer", interrupt_after_s=30)),
    (r"fusion-node ", Policy("ok", interrupt_after_s=120)),
]


def readme_commands(text: str) -> list[str]:
    """The shell commands of README.md's indented code lines, comments stripped."""
    commands = []
    for line in text.splitlines():
        if re.match(r"^ {4}(\.venv/bin/|bash scripts/setup)", line):
            command = line.strip()
            # "  # comment" ends a line; a '#' inside a word (an URL's) does not.
            commands.append(re.sub(r"\s+#\s.*$", "", command))
    return commands


def policy_for(command: str) -> Policy:
    for pattern, policy in POLICIES:
        if re.search(pattern, command):
            return policy
    raise LookupError(f"no walk policy for the README command {command!r}: add one to "
                      f"scripts/readme_walk.py")


@dataclass
class Outcome:
    command: str
    policy: Policy
    code: int | None
    seconds: float
    problems: list[str]


def _run(command: str, cwd: Path, interrupt_after_s: float | None) -> tuple[int, str, float]:
    started = time.monotonic()
    # exec: the exit status and the Ctrl-C are the command's own, not a shell's around it.
    process = subprocess.Popen(f"exec {command}", shell=True, cwd=cwd, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=interrupt_after_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
        try:
            output, _ = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            output += "\n[walk: still running 60 s after SIGINT, killed]"
    return process.returncode, output, time.monotonic() - started


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("fusion-node: error")]


def judge(policy: Policy, code: int, output: str, interrupted: bool) -> list[str]:
    problems = []
    if "Traceback (most recent call last)" in output:
        problems.append("a traceback")
    if policy.expect == "ok" and code != 0:
        problems.append(f"exit {code}, expected 0")
    elif policy.expect == "one-line error":
        if code in (0, None):
            problems.append(f"exit {code}: a false success ({policy.why})")
        elif len(_error_lines(output)) != 1:
            problems.append(f"{len(_error_lines(output))} 'fusion-node: error' lines, "
                            "expected 1")
    elif policy.expect == "interrupted" and not interrupted and code != 0:
        problems.append(f"exit {code} before it was interrupted")
    elif policy.expect == "interrupted" and interrupted and code not in (0, 1, 130, -2):
        problems.append(f"exit {code} after Ctrl-C")
    return problems


def without_setup(command: str) -> str:
    return re.sub(r"^bash scripts/setup\.sh[^&]*&&\s*", "", command)


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGINT)
    process.wait(timeout=60)


def walk(commands: list[str], clone: Path, log: Path) -> list[Outcome]:
    outcomes = []
    running: dict[str, subprocess.Popen[bytes]] = {}
    with log.open("w") as transcript:
        for command in commands:
            policy = policy_for(command)
            if policy.expect == "skip":
                outcomes.append(Outcome(command, policy, None, 0.0, []))
                continue
            for name in [n for n in running if n not in policy.background]:
                _stop(running.pop(name))
            for name in policy.background:
                if name not in running:
                    running[name] = subprocess.Popen(
                        shlex.split(name), cwd=clone, stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                        start_new_session=True)
                    time.sleep(6)  # drivers and engines up
            code, output, seconds = _run(command, clone, policy.interrupt_after_s)
            interrupted = (policy.interrupt_after_s is not None
                           and seconds >= policy.interrupt_after_s)
            problems = judge(policy, code, output, interrupted)
            transcript.write(f"$ {command}\n{output}\n[exit {code}, {seconds:.1f} s]\n\n")
            if policy.writes and (clone / policy.writes).exists():
                again_code, again, _ = _run(command, clone, policy.interrupt_after_s)
                transcript.write(f"$ {command}   (again)\n{again}\n[exit {again_code}]\n\n")
                if again_code != 1 or len(_error_lines(again)) != 1 or "exists" not in again:
                    problems.append(f"run again, it did not refuse to overwrite "
                                    f"{policy.writes} (exit {again_code})")
            outcomes.append(Outcome(command, policy, code, seconds, problems))
            status = "ok" if not problems else "FAIL: " + "; ".join(problems)
            print(f"{status:<6} {seconds:6.1f} s  exit {code!s:>4}  {command}", flush=True)
    for process in running.values():
        _stop(process)
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="list the commands and policies")
    parser.add_argument("--setup", action="store_true",
                        help="also run the set-up lines (minutes; needs the registries)")
    parser.add_argument("--log", type=Path, default=Path("readme-walk.log"),
                        help="every command's output (default: readme-walk.log)")
    args = parser.parse_args(argv)
    # Started in a script's background, this process inherits SIGINT ignored, and so would
    # every command it runs: the walk's Ctrl-C must reach them as a user's would.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.setup:  # set-up, then the tests: up to 20 minutes as in CI
        POLICIES.insert(0, (r"^bash scripts/setup\.sh", Policy("ok", interrupt_after_s=1500)))
    commands = readme_commands((ROOT / "README.md").read_text())
    if not args.setup:
        commands = [without_setup(c) for c in commands]
    if args.list:
        for command in commands:
            policy = policy_for(command)
            print(f"{policy.expect:<15} {command}" + (f"   ({policy.why})" if policy.why else ""))
        return 0
    if args.log.exists():
        print(f"readme_walk: {args.log} exists; give another --log", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="readme-walk-") as scratch:
        clone = Path(scratch) / "fusion-node"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        if not args.setup:
            (clone / ".venv").symlink_to(ROOT / ".venv")
        outcomes = walk(commands, clone, args.log.resolve())
    failed = [o for o in outcomes if o.problems]
    ran = [o for o in outcomes if o.code is not None]
    print(f"readme walk: {len(ran)} commands run, {len(outcomes) - len(ran)} skipped, "
          f"{len(failed)} failed; transcript in {args.log}")
    return 1 if failed or not ran else 0


if __name__ == "__main__":
    sys.exit(main())
