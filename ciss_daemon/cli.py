"""The ``ciss`` command line: a thin Typer layer over the daemon's modules (``commands/``).

Library code raises :class:`~ciss_daemon.exceptions.CissError` (or the engine's ``EngineError``); the
commands print one line, ``Error: ...``, and exit with code 1, never a traceback. Commands that read the
catalog only (``status``, ``classes``) never import torch, and ``ciss status`` is answered by
``entry.py`` without this module when it can be.
"""

from __future__ import annotations

from ciss_daemon.commands.common import app

# Importing a module registers its commands, in the order ``ciss --help`` lists them.
# isort: off
from ciss_daemon.commands import intake  # noqa: E402, F401
from ciss_daemon.commands import reading  # noqa: E402, F401
from ciss_daemon.commands import operating  # noqa: E402, F401
from ciss_daemon.commands import models  # noqa: E402, F401
from ciss_daemon.commands import runs  # noqa: E402, F401

# isort: on

__all__ = ["app"]

if __name__ == "__main__":  # python -m ciss_daemon.cli: always the full command, without entry.py's fast path
    app()
