"""The driver protocol every sensor source implements."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np

from fusion_node.protocol import AudioChunk, Frame, JointState

Sample = Frame | AudioChunk | JointState


class Driver(Protocol):
    """An async source of samples stamped at capture on the node clock.

    Lifecycle: `await connect()`, then `await recv()` repeatedly, then `await disconnect()`.
    `recv()` raises `EndOfStream` when a finite source (a file) ends and `DriverError` when
    the device fails; it never invents a sample to hide a fault.
    """

    stream: str

    async def connect(self) -> None: ...

    async def recv(self) -> Sample: ...

    async def disconnect(self) -> None: ...


# Lends a writable array for the next sample of a stream: (stream, shape, dtype) -> array.
Loan = Callable[[str, tuple[int, ...], np.dtype], np.ndarray]


@runtime_checkable
class WritesIntoLoans(Protocol):
    """A driver that can write its samples straight into arrays its publisher lends
    (`Publisher.loan`: shared-memory slots), so nothing copies them on the way out."""

    def use_loans(self, loan: Loan) -> None: ...
