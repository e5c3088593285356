"""`fusion-node keys`: CurveZMQ key files for nodes bound beyond loopback (docs/security.md)."""

from __future__ import annotations

import argparse
from typing import Any


def add_keys_parser(commands: Any) -> None:
    keys = commands.add_parser("keys", help="CurveZMQ keys for a node reachable from other "
                               "hosts (docs/security.md)")
    actions = keys.add_subparsers(dest="keys_command", required=True)
    generate = actions.add_parser(
        "generate", help="write NAME.key (public) and NAME.key_secret (secret, mode 0600)")
    generate.add_argument("directory", help="where to write them (created 0700)")
    generate.add_argument("--name", default="server",
                          help="'server' (the node) or 'client-NAME' (a control loop or a "
                          "remote source); default: server")


def run_keys_command(args: argparse.Namespace) -> dict[str, Any]:
    """Generate the key pair; the paths and the public key, for the caller to distribute."""
    from fusion_node.security import generate_keys, load_public_key

    public_path, secret_path = generate_keys(args.directory, args.name)
    return {"public": str(public_path), "secret": str(secret_path),
            "public_key": load_public_key(public_path).decode()}
