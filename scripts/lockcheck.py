"""Compare the packages installed in this Python environment with a lock file.

    python scripts/lockcheck.py requirements/test.txt            # exit 1 and list differences
    python scripts/lockcheck.py requirements/test.txt --extras   # names installed but not locked

The lock is what `uv pip compile --generate-hashes` writes (scripts/lock.sh): one
`name==version [; marker]` line per package, hashes on continuation lines. Markers are
evaluated for this interpreter, so a universal lock checks as exactly as a platform one.
The project itself (installed editable) and pip are not in the lock.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import Marker
from packaging.utils import canonicalize_name

_NOT_LOCKED = {"fusion-node", "pip"}


def locked(path: Path) -> dict[str, str]:
    """{canonical name: version} of the lock's lines whose markers hold here."""
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9._-]+)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$", line)
        if match is None:
            continue
        name, version, marker = match.groups()
        if marker and not Marker(marker).evaluate():
            continue
        pins[canonicalize_name(name)] = version
    return pins


def installed() -> dict[str, str]:
    """{canonical name: version} of every distribution this interpreter sees, but the
    project and pip."""
    found = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    return {name: version for name, version in found.items() if name not in _NOT_LOCKED}


def differences(lock: Path) -> list[str]:
    """One line per package whose installed version is not the locked one."""
    want, have = locked(lock), installed()
    lines = []
    for name in sorted(want.keys() | have.keys()):
        if want.get(name) != have.get(name):
            lines.append(f"{name}: locked {want.get(name, '-')}, installed {have.get(name, '-')}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lock", type=Path)
    parser.add_argument("--extras", action="store_true",
                        help="print the installed packages the lock does not name, one a line")
    args = parser.parse_args(argv)
    if args.extras:
        print("\n".join(sorted(installed().keys() - locked(args.lock).keys())))
        return 0
    lines = differences(args.lock)
    for line in lines:
        print(line)
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
