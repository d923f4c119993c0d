"""Benchmarks of the daemon and the engine; not installed.

Run them from the repository root, e.g. ``python -m benchmarks.daemon status``.
"""
