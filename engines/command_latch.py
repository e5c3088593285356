"""The robot's current command, latched from the speech engine's command posteriors.

The speech engine names a command only while the word is inside its 0.64 s window, a few
predictions long; the arm must keep acting on it afterwards. The latch takes a command when
`confirmations` consecutive new predictions agree on it with at least `threshold`
probability (one confident window is not enough: a cut-off word can look like another), and
keeps it until a different command is taken. The action model gets the latched command as a
one-hot vector, valid once any command has been taken.
"""

from __future__ import annotations

import numpy as np

from engines.vocabulary import COMMANDS


class CommandLatch:
    def __init__(self, threshold: float = 0.6, confirmations: int = 2) -> None:
        if not 0 < threshold <= 1 or confirmations < 1:
            raise ValueError(f"command latch: threshold {threshold} must be in (0, 1] and "
                             f"confirmations {confirmations} >= 1")
        self.threshold = threshold
        self.confirmations = confirmations
        self.command = 0  # index into COMMANDS; 0: nothing taken yet
        self._candidate = 0
        self._streak = 0

    def update(self, posterior: np.ndarray) -> int:
        """Take one new command posterior; return the latched command index."""
        posterior = np.asarray(posterior, np.float64)
        if posterior.shape != (len(COMMANDS),) or not np.all(np.isfinite(posterior)):
            raise ValueError(f"command latch: expected {len(COMMANDS)} finite "
                             f"probabilities, got shape {posterior.shape}")
        best = int(posterior.argmax())
        if best == 0 or posterior[best] < self.threshold:
            self._candidate, self._streak = 0, 0
            return self.command
        if best == self._candidate:
            self._streak += 1
        else:
            self._candidate, self._streak = best, 1
        if self._streak >= self.confirmations:
            self.command = best
        return self.command

    def feeds(self) -> tuple[np.ndarray, float]:
        """(one-hot command [len(COMMANDS)] float32, valid 1.0 / 0.0) for the action model."""
        one_hot = np.zeros(len(COMMANDS), np.float32)
        if self.command == 0:
            return one_hot, 0.0
        one_hot[self.command] = 1.0
        return one_hot, 1.0

    def reset(self) -> None:
        self.command, self._candidate, self._streak = 0, 0, 0
