"""The command vocabulary shared by the speech model's head and the action model's input.

Kept apart from `training.models` so that code without torch (the node, decoders) can name the
command classes.
"""

# Index 0 is "no command"; the order is part of both models' interface: change it only together
# with retrained models.
COMMANDS: tuple[str, ...] = (
    "none",
    "stop",
    "home",
    "go",
    "left",
    "right",
    "up",
    "down",
    "red",
    "green",
    "blue",
    "yellow",
    "pick",
    "place",
    "open",
    "close",
    "wait",
)
