"""The driver protocol every sensor source implements."""

from __future__ import annotations

from typing import Protocol

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
