"""``egressd run --watch``: reload the policy when its files change on disk, without a signal.

Policies reach nodes through configuration management, and neither Ansible/Puppet nor a
Kubernetes ConfigMap volume sends SIGHUP. The two ways a file is replaced, and how each is seen:

* **in place or by rename** (Ansible's ``copy`` writes a temporary file and renames it over the
  target; an editor may rewrite it): the path's inode, size or mtime changes;
* **the kubelet's atomic swap** of a ConfigMap volume: the files are written into a new
  timestamped directory ``..2026_12_05_07_30_00.123456789``, a symlink ``..data_tmp`` to it
  is created and renamed over ``..data``, and the visible ``default.yaml`` is a symlink to
  ``..data/default.yaml`` that never changes itself. ``os.stat`` follows the chain, so the
  path now resolves to a different inode; the resolved path is compared as well.

Why polling ``stat`` and not inotify: inotify watches inodes, so a watch on the file is lost
at the first rename and the kubelet's swap changes a symlink in the *parent* directory; doing
it right means re-arming watches on directories after every event. A ``stat`` of each policy
file every half second costs microseconds, needs no dependency, and sees every one of these
cases the same way. A change is acted on once it has been stable for one more poll, so a file
being rewritten in place is not read half-written; the reload itself is the SIGHUP path
(``Daemon.reload``): the new policy is loaded beside the old one and replaces it only if it
loads completely, otherwise the running one stays and the error is logged with file:line.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable, Iterable
from typing import Final

INTERVAL: Final = 0.5  # seconds between polls; a reload follows a change within two polls

Signature = tuple[tuple[str, str, int, int, int, int] | None, ...]


def signature(paths: Iterable[str]) -> Signature:
    """What identifies the content of each file without reading it."""
    out: list[tuple[str, str, int, int, int, int] | None] = []
    for p in paths:
        try:
            st = os.stat(p)
            real = os.path.realpath(p)
        except OSError:
            out.append(None)  # missing (mid-swap, or deleted): a change too
            continue
        out.append((p, real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


class PolicyWatch:
    """Polls the files of a policy; :meth:`poll` is True once a change has settled."""

    def __init__(self, paths: Iterable[str]) -> None:
        self.paths = list(dict.fromkeys(paths))
        self.seen = signature(self.paths)
        self._pending: Signature | None = None

    def poll(self) -> bool:
        now = signature(self.paths)
        if now == self.seen:
            self._pending = None
            return False
        if now != self._pending:
            self._pending = now  # changed since the last poll: wait until it holds still
            return False
        self.seen = now
        self._pending = None
        return True

    def rearm(self, paths: Iterable[str]) -> None:
        """After a reload: the policy may include other files now. The signature taken by
        the poll that saw the change is kept for the files already watched, so a change made
        while the reload ran is seen at the next poll."""
        new = list(dict.fromkeys(paths))
        if new != self.paths:
            old = dict(zip(self.paths, self.seen, strict=True))
            fresh = signature(p for p in new if p not in old)
            it = iter(fresh)
            self.seen = tuple(old[p] if p in old else next(it) for p in new)
            self.paths = new
        self._pending = None


async def watch(files: Callable[[], list[str]], reload: Callable[[], bool], interval: float = INTERVAL) -> None:
    """Forever: poll ``files()``, and call ``reload()`` (the SIGHUP path) on a settled change."""
    w = PolicyWatch(files())
    while True:
        await asyncio.sleep(interval)
        if w.poll():
            print("egressd: the policy files changed on disk (--watch); reloading", flush=True, file=sys.stderr)
            reload()
            w.rearm(files())
