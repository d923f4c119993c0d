"""Benchmarks of the daemon's own figures, one module a section: ``status`` (``ciss status`` on a catalog of
1,000 steps), ``ingest`` (a complete folder to a queued step), ``idle`` (CPU and memory of an idle daemon),
``report`` (the results as Markdown and a terminal table). ``python -m benchmarks.daemon`` runs them
(``__main__``).
"""
