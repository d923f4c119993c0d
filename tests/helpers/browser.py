"""Real-browser helpers: Debian's Chromium driven by Playwright, and `ciss web` as a process.

Import as `from browser import ...` (pytest puts tests/ on sys.path). The browser is the system's
(/usr/bin/chromium, `apt-get install chromium` in .ci/run); nothing is ever downloaded. Tests using it are
marked ``browser`` and skip when it is missing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from benchmarks.dashboard import (  # one browser set-up for the tests and the benchmark
    CHROMIUM,
    CHROMIUM_FLAGS,
)
from ciss_daemon.workspace import Workspace

needs_chromium = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason=f"needs Chromium at {CHROMIUM} (apt-get install chromium)"
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60) -> None:
    """Wait until ``url`` answers 200."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} did not answer within {timeout:.0f} s")
        time.sleep(0.2)


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.loads(answer.read())


@contextmanager
def ciss_web(ws: Workspace, port: int) -> Iterator[str]:
    """`ciss web` serving ``ws`` on 127.0.0.1:``port``; yields its base URL."""
    log = open(ws.root / "web.log", "ab")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "ciss_daemon.cli", "web", "--workspace", str(ws.root), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/api/live")
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
        log.close()


@contextmanager
def chromium() -> Iterator[Any]:
    """A new page in headless Chromium."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            yield page
        finally:
            browser.close()


def charts_drawn(page: Any) -> dict[str, bool]:
    """For each chart canvas: whether Chart.js has a chart on it and the canvas holds any drawn pixel."""
    return page.evaluate(
        """() => Object.fromEntries([...document.querySelectorAll('canvas')].map((c) => {
            const chart = Chart.getChart(c);
            const context = c.getContext('2d');
            const pixels = c.width && c.height ? context.getImageData(0, 0, c.width, c.height).data : [];
            let drawn = false;
            for (let i = 3; i < pixels.length; i += 4) { if (pixels[i] !== 0) { drawn = true; break; } }
            return [c.id, !!chart && drawn];
        }))"""
    )
