"""Supervised child processes: restart with exponential back-off, give up after N failures.

A driver that crashes (a camera unplugged, a USB reset) is restarted; one that keeps
crashing is given up on and reported dead, and the node goes on with that modality masked.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 5
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 10.0
    # A process that ran this long before failing was healthy: its failure count restarts.
    stable_s: float = 30.0


class SupervisedProcess:
    """One child process kept running by `run()` until `stop()`."""

    def __init__(self, name: str, argv: list[str], policy: RestartPolicy) -> None:
        self.name = name
        self.argv = argv  # the command line each (re)start runs
        self._policy = policy
        self._process: asyncio.subprocess.Process | None = None
        self._stopping = asyncio.Event()
        self.state = "starting"
        self.restarts = 0
        self.failures = 0
        self.last_exit_code: int | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def kill(self) -> None:
        """Kill the current process abruptly (tests use this to simulate a crash)."""
        if self._process is not None and self._process.returncode is None:
            self._process.kill()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        backoff_s = self._policy.backoff_initial_s
        while not self._stopping.is_set():
            started = loop.time()
            self._process = await asyncio.create_subprocess_exec(*self.argv)
            self.state = "running"
            self.last_exit_code = await self._process.wait()
            if self._stopping.is_set():
                break
            if loop.time() - started >= self._policy.stable_s:
                self.failures = 0
                backoff_s = self._policy.backoff_initial_s
            self.failures += 1
            if self.failures > self._policy.max_restarts:
                self.state = "dead"
                log.error("%s exited with %s; gave up after %d restarts", self.name,
                          self.last_exit_code, self.restarts)
                return
            self.state = "restarting"
            log.warning("%s exited with %s; restarting in %.1f s", self.name,
                        self.last_exit_code, backoff_s)
            try:
                await asyncio.wait_for(self._stopping.wait(), backoff_s)
            except TimeoutError:
                pass
            backoff_s = min(backoff_s * 2, self._policy.backoff_max_s)
            self.restarts += 1
        self.state = "stopped"

    async def stop(self, timeout_s: float) -> None:
        """SIGTERM, then SIGKILL after `timeout_s`."""
        self._stopping.set()
        process = self._process
        if process is None or process.returncode is not None:
            if self.state != "dead":
                self.state = "stopped"
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), timeout_s)
        except TimeoutError:
            log.warning("%s ignored SIGTERM for %.1f s; killing it", self.name, timeout_s)
            process.kill()
            await process.wait()
        self.last_exit_code = process.returncode
        self.state = "stopped"

    def summary(self) -> dict[str, object]:
        return {"state": self.state, "running": self.state == "running", "pid": self.pid,
                "restarts": self.restarts, "exit_code": self.last_exit_code}
