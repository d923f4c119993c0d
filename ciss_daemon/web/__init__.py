"""The dashboard: ``ciss web``, or served by the daemon with ``[web] enabled = true``.

A Starlette app (``app.py``) renders Jinja2 templates (autoescaped) and serves ``/metrics``
(``metrics.py``); charts are drawn in the browser by the vendored Chart.js in ``static/``. It reads the
catalog and the job folders only and never imports torch; operator actions go through
:func:`ciss_daemon.service.operator.run_action`, as ``ciss promote`` does. Its packages are the optional extra
``ciss[web]``: this module imports none of them until :func:`require` has checked they are there.
"""

from __future__ import annotations

import importlib.util
import threading
from typing import TYPE_CHECKING, Any

from ciss_daemon.exceptions import CissError

if TYPE_CHECKING:
    from ciss_daemon.settings import Settings
    from ciss_daemon.workspace import Workspace

# Module name -> distribution, of what the extra installs.
EXTRA_MODULES = {
    "starlette": "starlette",
    "jinja2": "jinja2",
    "uvicorn": "uvicorn",
    "prometheus_client": "prometheus-client",
}


class WebError(CissError):
    """The dashboard cannot start: its packages are missing, or its address is taken."""


def require() -> None:
    """Raise :class:`WebError` (one line naming the fix) unless the ``ciss[web]`` extra is installed."""
    missing = [dist for module, dist in EXTRA_MODULES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise WebError(
            f"the dashboard needs {', '.join(missing)}, which is not installed; run: pip install 'ciss[web]'"
        )


def _server(ws: Workspace, settings: Settings, host: str, port: int) -> Any:
    require()
    import uvicorn

    from ciss_daemon.web.app import create_app

    config = uvicorn.Config(
        create_app(ws, settings), host=host, port=port, log_level="warning", access_log=False, lifespan="off"
    )
    return uvicorn.Server(config)


def _bind_error(host: str, port: int, error: BaseException | str) -> WebError:
    return WebError(
        f"cannot serve the dashboard on {host}:{port} ({error}); choose another [web] port or stop what "
        "uses it"
    )


def serve(ws: Workspace, settings: Settings, *, host: str, port: int) -> None:
    """``ciss web``: serve in the foreground until Ctrl-C."""
    server = _server(ws, settings, host, port)
    try:
        server.run()
    except (OSError, SystemExit) as error:  # uvicorn logs a failed bind, then exits
        if server.started:
            raise
        reason = error if isinstance(error, OSError) else "the address is in use or not available"
        raise _bind_error(host, port, reason) from None


class WebThread:
    """The dashboard served from a background thread of the daemon; :meth:`stop` ends it."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.thread = threading.Thread(target=server.run, name="ciss-web", daemon=True)

    def start(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.thread.start()
        for _ in range(int(timeout / 0.05)):
            if self.server.started or not self.thread.is_alive():
                break
            self.thread.join(0.05)
        if not self.server.started:
            self.stop()
            raise _bind_error(host, port, OSError("the server did not start"))

    def stop(self, timeout: float = 5.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def serve_in_thread(ws: Workspace, settings: Settings) -> WebThread:
    """Start the dashboard on ``[web] host`` and ``port`` in a thread (the daemon's ``[web] enabled``)."""
    web = WebThread(_server(ws, settings, settings.web.host, settings.web.port))
    web.start(settings.web.host, settings.web.port)
    return web
