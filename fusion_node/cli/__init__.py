"""The `fusion-node` command: one module per subcommand group; `main` is in `main.py`."""

from fusion_node.cli.main import main

__all__ = ["main"]
