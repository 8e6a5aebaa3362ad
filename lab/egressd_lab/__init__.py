"""egressd-lab: the development-only side of egressd, never installed on a node.

Network-namespace labs (``netns``), real protocol peers including a Stratum pool and a miner
client (``peers``, ``stratum``), the ``make run`` demo (``demo``), the harnesses the end-to-end
tests and the benchmarks share (``harness``, ``load``), the parser fuzzer (``fuzz``) and the
corpus locator (``corpus``). It exists so that every claim egressd makes about live traffic can
be shown with real programs over a real kernel path; the egressd wheel leaves it out (a
production node must not carry a working miner handshake client).
"""
