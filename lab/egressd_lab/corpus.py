"""Where the labelled real captures are (``shared/corpus`` beside the checkout, or ``$EGRESSD_CORPUS``).

Why in the lab package: the corpus test (tests/test_corpus.py) and the replay benchmark
(bench/replay.py) read the same captures and must find them the same way; the corpus itself is
never copied into the repository.
"""

from __future__ import annotations

import os
from pathlib import Path


def corpus_dir() -> Path | None:
    """The corpus directory (it holds LABELS.json), or None when this machine has none."""
    env = os.environ.get("EGRESSD_CORPUS")
    candidates = [Path(env)] if env else []
    checkout = Path(__file__).resolve().parents[2]  # <checkout>/lab/egressd_lab/corpus.py
    candidates += [checkout.parent / "shared" / "corpus", checkout / "shared" / "corpus"]
    for c in candidates:
        if (c / "LABELS.json").is_file():
            return c
    return None
