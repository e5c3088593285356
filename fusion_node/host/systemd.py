"""systemd's notify protocol (sd_notify), spoken directly: one datagram per state change.

With `Type=notify` systemd waits for READY=1, sent once the engines are warm and the first
samples are in. With `WatchdogSec=`, the node's event loop sends WATCHDOG=1 at half that
period; a hung loop stops sending and systemd restarts the service.
"""

from __future__ import annotations

import os
import socket


class SystemdNotifier:
    """Sends notifications to `$NOTIFY_SOCKET`; does nothing when not run by systemd."""

    def __init__(self) -> None:
        address = os.environ.get("NOTIFY_SOCKET", "")
        # A leading '@' names a socket in Linux's abstract namespace.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        watchdog_usec = os.environ.get("WATCHDOG_USEC", "")
        watchdog_pid = os.environ.get("WATCHDOG_PID", "")
        mine = not watchdog_pid or watchdog_pid == str(os.getpid())
        self.watchdog_period_s = (int(watchdog_usec) / 1e6 / 2
                                  if watchdog_usec.isdigit() and mine else None)

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def notify(self, state: str) -> None:
        if not self._address:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(self._address)
            sock.sendall(state.encode())

    def ready(self) -> None:
        self.notify("READY=1\nSTATUS=engines warm, publishing")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def stopping(self) -> None:
        self.notify("STOPPING=1")
