"""A ConfigMap volume written exactly as the kubelet writes it (for the --watch tests).

The kubelet's AtomicWriter (pkg/volume/util/atomic_writer.go), for each update of the volume:

1. creates a new directory named from the UTC time, ``..2006_01_02_15_04_05.`` plus random
   digits (``os.MkdirTemp`` with that prefix), and writes every file of the payload into it;
2. creates the symlink ``..data_tmp`` pointing to that directory's name (relative);
3. renames ``..data_tmp`` over ``..data`` — the one atomic step;
4. creates, once, the user-visible symlinks ``<top-level name> -> ..data/<top-level name>``;
5. removes the previous timestamped directory.

A reader that opened ``default.yaml`` before step 3 sees the old files, after it the new ones,
never a mix: which is why egressd must follow the ``..data`` link, not watch the file.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import tempfile
from pathlib import Path


class ConfigMapVolume:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def write(self, files: dict[str, str]) -> Path:
        """One update of the volume: ``files`` maps paths (may contain '/') to their text."""
        prefix = _dt.datetime.now(_dt.UTC).strftime("..%Y_%m_%d_%H_%M_%S.")
        ts_dir = Path(tempfile.mkdtemp(prefix=prefix, dir=self.root))
        for rel, text in files.items():
            p = ts_dir / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
        data = self.root / "..data"
        old = os.readlink(data) if data.is_symlink() else None
        tmp_link = self.root / "..data_tmp"
        os.symlink(ts_dir.name, tmp_link)
        os.rename(tmp_link, data)
        for top in {rel.split("/", 1)[0] for rel in files}:
            visible = self.root / top
            if not visible.is_symlink():
                os.symlink(f"..data/{top}", visible)
        if old is not None:
            shutil.rmtree(self.root / old)
        return self.root
