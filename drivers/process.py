"""Run one driver and publish its samples on ZeroMQ (the body of `python -m drivers`)."""

from __future__ import annotations

import asyncio

import numpy as np

from drivers.base import Driver, Loan, WritesIntoLoans
from fusion_node.errors import DriverError, EndOfStream
from fusion_node.shm import RingFull
from fusion_node.transport import Publisher

DISCONNECT_TIMEOUT_S = 3.0


def loan_or_plain(publisher: Publisher) -> Loan:
    """`publisher.loan`, or a plain array when the ring is full (every slot held by
    subscribers): the sample then goes inline, which the publisher counts and logs as a
    fallback, unless a slot was released before it is sent."""
    def loan(stream: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        try:
            return publisher.loan(stream, shape, dtype)
        except RingFull:
            return np.empty(shape, dtype)
    return loan


async def publish_driver(driver: Driver, publisher: Publisher) -> int:
    """Connect `driver`, send every sample on `publisher` until the source ends, disconnect.

    Returns the number of samples sent. Cancelling it (how a shutdown stops it) still
    disconnects the driver, within `DISCONNECT_TIMEOUT_S`, and then re-raises.
    """
    sent = 0
    if isinstance(driver, WritesIntoLoans):
        driver.use_loans(loan_or_plain(publisher))
    try:
        await driver.connect()
        while True:
            try:
                sample = await driver.recv()
            except EndOfStream:
                return sent
            publisher.send(sample)
            sent += 1
    finally:
        try:
            async with asyncio.timeout(DISCONNECT_TIMEOUT_S):
                await driver.disconnect()
        except TimeoutError:
            raise DriverError(f"driver for stream {driver.stream!r} did not disconnect "
                              f"within {DISCONNECT_TIMEOUT_S} s") from None
