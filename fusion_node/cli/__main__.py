"""`python -m fusion_node.cli`: the `fusion-node` command."""

import sys

from fusion_node.cli.main import main

sys.exit(main())
