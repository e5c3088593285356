"""Thread priorities: what the node asks of the scheduler, and what it got.

Each helper returns what was granted ("SCHED_FIFO 10", "nice -5" or "default"), which
`node.health` shows: a node that is not allowed real-time priority (no root, no
CAP_SYS_NICE) still runs, and says so.
"""

from __future__ import annotations

import os
import threading

import zmq

PUBLISHER_RT_PRIORITY = 10
ENGINE_RT_PRIORITY = 5
_NICE_STEP = 5


def raise_thread_priority(rt_priority: int = PUBLISHER_RT_PRIORITY) -> str:
    """Give the calling thread real-time priority if allowed (root or CAP_SYS_NICE), else a
    lower nice value if allowed; returns what was granted.

    The publisher gets the highest priority: publishing on time must win the core. Engine
    runners get a lower real-time one, so that driver processes and other programs on the
    host cannot stretch an inference past its deadline (inference uses ~15% of one core;
    Linux's real-time throttling keeps a share for everything else).
    """
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(rt_priority))
        return f"SCHED_FIFO {rt_priority}"
    except (PermissionError, OSError):
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), -_NICE_STEP)
        return f"nice -{_NICE_STEP}"
    except (PermissionError, OSError):
        return "default"


def raise_thread_niceness() -> str:
    """Give the calling thread a lower nice value if allowed; returns what was granted.

    For the node's threads that are not real-time (receiver, recorder, clock trackers): a
    real-time engine waiting for the GIL waits for whichever thread holds it, so a holder
    pre-empted by other processes would delay it (priority inversion)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), -_NICE_STEP)
        return f"nice -{_NICE_STEP}"
    except (PermissionError, OSError):
        return "default"


def realtime_allowed() -> bool:
    """Whether this process may use SCHED_FIFO, tried on a throwaway thread."""
    result: list[bool] = []

    def attempt() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(PUBLISHER_RT_PRIORITY))
            result.append(True)
        except (PermissionError, OSError):
            result.append(False)

    thread = threading.Thread(target=attempt, name="realtime probe")
    thread.start()
    thread.join()
    return result[0]


def realtime_context() -> zmq.Context:
    """A ZeroMQ context whose I/O threads, which do the actual sending and receiving, run
    at the publisher's real-time priority when that is allowed."""
    context = zmq.Context()
    # libzmq aborts the process if it cannot apply these, so set them only when allowed.
    if realtime_allowed():
        context.set(zmq.THREAD_SCHED_POLICY, os.SCHED_FIFO)
        context.set(zmq.THREAD_PRIORITY, PUBLISHER_RT_PRIORITY)
    return context
