"""Shared test configuration: prints the corpus score table at the end of the run."""

from __future__ import annotations

import pytest


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    table = getattr(pytest, "corpus_table", None)
    if table:
        terminalreporter.write_sep("-", "egressd vs ndpiReader 4.2 on ../shared/corpus (flows)")
        terminalreporter.write_line(table)
