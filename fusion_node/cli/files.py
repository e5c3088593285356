"""Files the commands write: checked before anything starts, never replaced unless asked."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fusion_node.errors import ConfigError

FORCE_HELP = "replace an output file that exists (without it the command refuses)"


def add_force(parser: Any) -> None:
    parser.add_argument("--force", action="store_true", help=FORCE_HELP)


def check_output(path: str | None, force: bool, option: str) -> None:
    """ConfigError naming `option` if `path` exists (and not `force`), is a folder, or its
    folder is missing or not writable: one line, before any driver or engine starts."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"{option} {path}: is a folder, not a file")
    if target.exists() and not force:
        raise ConfigError(f"{option} {path}: exists; pass --force to overwrite it")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise ConfigError(f"{option} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: folder {folder} is not writable")
