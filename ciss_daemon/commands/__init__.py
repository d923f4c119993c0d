"""The ``ciss`` commands by theme; ``cli.py`` gathers them on one Typer app, in the order of ``--help``."""
