"""Protocol detectors: pure functions over the reassembled head of a flow (see base.py)."""
