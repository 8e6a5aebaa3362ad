"""Where decision events go: a JSON-lines file and/or stdout, flushed per decision.

Why flush per alert: an alert written just before a crash must be on disk — the one event
that explains why a node lost its reverse tunnel is the one an operator will look for. Routine
"allowed by default" flow records are flushed once per batch of packets (``flush()``, called
by the daemon after each wake-up, microseconds later): one write per connection would
otherwise be a third of the cost of judging it.

Why the writer never raises: a full disk or a log file removed by a rotation must not stop
enforcement. Write errors are counted (and shown by ``egressd status``); a file that was
moved or truncated by logrotate is noticed on the next ``check_rotation`` and reopened.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import TextIO

from egressd.events import Event


class EventLog:
    def __init__(self, path: str | None, stdout: bool = False) -> None:
        self.path = path
        self.stdout = stdout
        self.written = 0
        self.errors = 0
        self.last_error = ""
        self._fh: TextIO | None = None
        self._ino = -1
        self._dirty = False
        if path:
            self._open()

    def _open(self) -> None:
        assert self.path is not None
        try:
            if self._fh is not None:
                self._fh.close()
            self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open on purpose
            self._ino = os.fstat(self._fh.fileno()).st_ino
        except OSError as e:
            self._fh = None
            self.errors += 1
            self.last_error = f"{self.path}: {e.strerror or e}"

    def write(self, ev: Event) -> None:
        line = ev.to_json() + "\n"
        if self.stdout:
            try:
                sys.stdout.write(line)
                sys.stdout.flush()
            except OSError as e:
                self.errors += 1
                self.last_error = f"stdout: {e.strerror or e}"
        if self.path:
            if self._fh is None:
                self._open()
            if self._fh is not None:
                try:
                    self._fh.write(line)
                    if ev.event_type == "alert":
                        self._fh.flush()
                    else:
                        self._dirty = True
                except OSError as e:
                    self.errors += 1
                    self.last_error = f"{self.path}: {e.strerror or e}"
                    return
        self.written += 1

    def flush(self) -> None:
        if self._dirty and self._fh is not None:
            self._dirty = False
            try:
                self._fh.flush()
            except OSError as e:
                self.errors += 1
                self.last_error = f"{self.path}: {e.strerror or e}"

    def check_rotation(self) -> None:
        """Reopen when the file was moved away (new inode) or truncated under us."""
        if not self.path:
            return
        try:
            st = os.stat(self.path)
        except OSError:
            self._open()
            return
        if self._fh is None or st.st_ino != self._ino:
            self._open()
            return
        try:
            if st.st_size < self._fh.tell():
                self._fh.seek(0, os.SEEK_END)
        except OSError as e:
            self.errors += 1
            self.last_error = f"{self.path}: {e.strerror or e}"

    def close(self) -> None:
        self.flush()
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
            self._fh = None
