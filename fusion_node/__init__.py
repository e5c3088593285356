"""fusion-node: a real-time sensor fusion daemon for robots."""

__version__ = "0.1.0"
