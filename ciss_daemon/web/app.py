"""The dashboard's Starlette app: the page, its live JSON, operator actions, ``/metrics``, sample images.

Who may do what:
- Reading needs nothing: bind to 127.0.0.1 (the default) or put an authenticating proxy in front.
- Operator actions need ``[web] token``; without one the dashboard is read-only. The token travels in an
  ``Authorization: Bearer`` header set by the page's script, never in a cookie, so another site cannot make
  a browser send it (no ambient credentials: nothing to forge); a request whose ``Origin`` is another site
  is refused as well. Actions go through :func:`ciss_daemon.service.operator.run_action`, exactly as the CLI's
  (to the running daemon through ``requests/``, or under its lock when none runs).
- Files: only the packaged ``static/`` folder and the sample pictures are served, through
  :func:`safe_file`, which refuses ``..``, absolute paths, encoded slashes and symbolic links.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from ciss_daemon import views
from ciss_daemon.catalog import connection
from ciss_daemon.exceptions import CissError
from ciss_daemon.service.operator import run_action
from ciss_daemon.settings import Settings
from ciss_daemon.web import charts, metrics, polling, samples
from ciss_daemon.web import data as dashboard_data
from ciss_daemon.workspace import Workspace

HERE = Path(__file__).resolve().parent
ACTION_TIMEOUT = 60.0
ACTIONS = ("promote", "discard", "rollback")  # of the CLI's operator actions, those the page offers
# Scripts and styles come from this server only (no inline script runs); no framing.
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
        b"form-action 'none'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


class SecurityHeaders:
    """Adds :data:`SECURITY_HEADERS` to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


class Assets(StaticFiles):
    """The packaged static files, cached by browsers for a day: pages name them with ``?v=<hash of their
    contents>``, so a new version of ciss is fetched at once."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["cache-control"] = "public, max-age=86400"
        return response


def assets_version(folder: Path) -> str:
    """A short hash of every file in ``folder``, for the ``?v=`` of asset URLs."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def safe_file(root: Path, relative: str) -> Path | None:
    """``root/relative`` if it is a regular file inside ``root`` reached without any symbolic link.

    ``relative`` is the URL path as Starlette decoded it, so ``%2F`` arrives as ``/`` and ``%2e%2e`` as
    ``..``; both are refused here, as are backslashes, NUL bytes and absolute paths.
    """
    parts = relative.split("/")
    if not relative or "\\" in relative or "\0" in relative or relative.startswith("/"):
        return None
    if any(part in ("", ".", "..") for part in parts):
        return None
    path = root
    for part in parts:
        path = path / part
        if path.is_symlink():
            return None
    try:
        real = Path(os.path.realpath(path))
    except (OSError, ValueError):
        return None
    if not real.is_relative_to(Path(os.path.realpath(root))) or not real.is_file():
        return None
    return real


class Dashboard:
    """The routes' shared state: the workspace, a read-only catalog session factory, the token."""

    def __init__(self, ws: Workspace, settings: Settings) -> None:
        self.ws = ws
        self.settings = settings
        self.token = settings.web.token
        self.url = ws.catalog_url(settings)
        self._factory: sessionmaker[Session] | None = None
        self.templates = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
        )
        self.templates.filters["pct"] = views.pct
        self.templates.filters["when"] = _when
        self.templates.globals["assets"] = assets_version(HERE / "static")
        self.registry: Any = None
        self.charts = charts.ChartCache()

    def factory(self) -> sessionmaker[Session]:
        """The catalog, opened read-only on first use (a dashboard may start before the daemon made it)."""
        if self._factory is None:
            connection.check_catalog(self.url)
            self._factory = connection.session_factory(connection.make_engine(self.url, read_only=True))
            self.registry = metrics.registry(self.ws, self._factory)
        return self._factory

    # --- pages ---------------------------------------------------------------------------------------

    def page_data(self, *, all_steps: bool = False) -> dict[str, Any]:
        data = dashboard_data.dashboard(self.ws, self.factory(), self.settings, charts=self.charts)
        data["shown_steps"] = dashboard_data.shown_steps(data["steps"], all_steps=all_steps)
        current = data["current"]
        version = current["version"] if current else None
        if version is not None:
            samples.request(self.ws, version)
        data["samples"] = dashboard_data.sample_files(samples.folder(self.ws), version)
        data["actions"] = bool(self.token)
        return data

    def render(self, data: dict[str, Any]) -> str:
        return self.templates.get_template("dashboard.html").render(d=data)

    async def index(self, request: Request) -> Response:
        try:
            all_steps = request.query_params.get("steps") == "all"
            data = await run_in_threadpool(lambda: self.page_data(all_steps=all_steps))
        except CissError as error:
            page = self.templates.get_template("error.html").render(message=str(error))
            return HTMLResponse(page, status_code=503)
        return HTMLResponse(await run_in_threadpool(self.render, data))

    async def api_status(self, request: Request) -> Response:
        return await self._json(self.page_data)

    async def api_live(self, request: Request) -> Response:
        return await self._json(lambda: polling.live(self.ws, self.factory()))

    async def _json(self, read: Any) -> Response:
        try:
            return JSONResponse(await run_in_threadpool(read))
        except CissError as error:
            return JSONResponse({"ok": False, "message": str(error)}, status_code=503)

    async def prometheus(self, request: Request) -> Response:
        try:
            await run_in_threadpool(self.factory)
        except CissError as error:
            return Response(f"# {error}\n", status_code=503, media_type="text/plain")
        body = await run_in_threadpool(metrics.exposition, self.registry)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def sample(self, request: Request) -> Response:
        path = safe_file(samples.folder(self.ws), request.path_params["path"])
        if path is None or path.suffix != ".png":
            return Response("not found\n", status_code=404, media_type="text/plain")
        return FileResponse(path, media_type="image/png")

    # --- operator actions ----------------------------------------------------------------------------

    def _refusal(self, request: Request) -> JSONResponse | None:
        """Why this request may not act, as the response to send; None when it may."""
        if not self.token:
            return _refuse(403, "read-only dashboard: set [web] token in ciss.toml to allow operator actions")
        origin = request.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
            return _refuse(403, f"refused: the request comes from another site ({origin})")
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), self.token.encode()):
            return _refuse(401, "wrong or missing operator token; enter the [web] token of ciss.toml")
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return _refuse(415, "send the action as application/json")
        return None

    async def action(self, request: Request) -> Response:
        name = request.path_params["action"]
        if name not in ACTIONS:
            return _refuse(404, f"unknown action {name!r}; one of {', '.join(ACTIONS)}")
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        try:
            body = json.loads(await request.body() or b"{}")
            target = body.get("target") if isinstance(body, dict) else None
        except ValueError:
            return _refuse(400, "the request body is not JSON")
        if target is not None and not isinstance(target, str):
            return _refuse(400, "target must be a string such as v0003 or a step index")
        try:
            message = await run_in_threadpool(
                run_action, self.ws, self.url, name, target or None, timeout=ACTION_TIMEOUT
            )
        except CissError as error:
            return JSONResponse({"ok": False, "message": str(error)}, status_code=409)
        return JSONResponse({"ok": True, "message": message})


def _when(iso: str | None) -> str:
    """A catalog time (ISO, UTC) as the dashboard's local time, to the second."""
    return "-" if not iso else dt.datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _refuse(code: int, message: str) -> JSONResponse:
    return JSONResponse({"ok": False, "message": message}, status_code=code)


def create_app(ws: Workspace, settings: Settings) -> Starlette:
    """The dashboard of ``ws``; actions are enabled when ``settings.web.token`` is set."""
    d = Dashboard(ws, settings)
    routes = [
        Route("/", d.index),
        Route("/api/status", d.api_status),
        Route("/api/live", d.api_live),
        Route("/api/actions/{action}", d.action, methods=["POST"]),
        Route("/metrics", d.prometheus),
        Route("/samples/{path:path}", d.sample),
        Mount("/static", Assets(directory=HERE / "static", follow_symlink=False), name="static"),
    ]
    return Starlette(routes=routes, middleware=[Middleware(SecurityHeaders)])
