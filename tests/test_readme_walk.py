"""scripts/readme_walk.py walks every README command (about 15 minutes, run by hand before a
release); here: that it knows how to judge each one, and judges as a user would."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def walk():
    spec = importlib.util.spec_from_file_location("readme_walk", ROOT / "scripts/readme_walk.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["readme_walk"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_readme_command_has_a_policy(walk):
    commands = walk.readme_commands((ROOT / "README.md").read_text())
    assert len(commands) >= 25
    assert commands[0] == "bash scripts/setup.sh && .venv/bin/fusion-node run --duration 20"
    assert walk.without_setup(commands[0]) == ".venv/bin/fusion-node run --duration 20"
    for command in commands:  # a new README command without one fails here
        walk.policy_for(walk.without_setup(command))
    with pytest.raises(LookupError, match="no walk policy"):
        walk.policy_for("rm -rf /")


def test_judging(walk):
    ok, error = walk.Policy("ok"), walk.Policy("one-line error")
    assert walk.judge(ok, 0, "fine", False) == []
    assert walk.judge(ok, 1, "x", False) == ["exit 1, expected 0"]
    assert walk.judge(ok, 0, "Traceback (most recent call last):\n", False) == ["a traceback"]
    assert walk.judge(error, 1, "fusion-node: error: no shots/ folder", False) == []
    assert "false success" in walk.judge(error, 0, "", False)[0]
    assert "2 'fusion-node: error' lines" in walk.judge(
        error, 1, "fusion-node: error: a\nfusion-node: error: b", False)[0]
