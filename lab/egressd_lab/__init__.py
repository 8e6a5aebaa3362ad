"""Namespaces and protocol peers for the demo, the capture script and the end-to-end tests.

Nothing here runs on a production node's hot path; it exists so that every claim egressd makes
about live traffic can be shown with real programs over a real kernel path.
"""
