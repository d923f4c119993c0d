"""A throwaway Ray head for the tests that train a step on Ray (``daemon.launcher = "ray"``).

The ``ray_head`` fixture (conftest.py) starts ``ray start --head --block`` on 127.0.0.1, small (2 logical
CPUs, no GPU, a 100 MB object store, no dashboard) with its own temporary folder, and stops it at the end of
the session by signalling that one command, which stops every process it started (never ``ray stop``,
which would stop every Ray node of the machine). Without Ray installed the tests skip, unless
``CISS_TEST_RAY_REQUIRED=1`` (set by ``.ci/run``) makes that a failure.

The tests reach the head at 127.0.0.1; Ray itself names the node by the machine's own address (it turns
``--node-ip-address=127.0.0.1`` into that) and its servers listen on every interface, so the head is
reachable from the machine's network while the tests run, as any Ray head is.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REQUIRED_ENV = "CISS_TEST_RAY_REQUIRED"
REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = 180.0  # seconds; a head starts in about 20 s on a loaded 2-core box


class Unavailable(Exception):
    """No Ray head can be had on this machine."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def ray_head(num_cpus: int = 2) -> Iterator[str]:
    """A Ray head on 127.0.0.1 for the block; yields its address ``127.0.0.1:PORT``."""
    ray = Path(sys.executable).with_name("ray")
    if not ray.exists():
        raise Unavailable(f"Ray is not installed ({ray} is missing): pip install -e '.[ray]'")
    root = Path(tempfile.mkdtemp(prefix="ciss-ray-"))  # short: Ray's socket paths live under it
    port = _free_port()
    command = [
        str(ray),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        "--object-store-memory=100000000",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--temp-dir={root}",
    ]
    # The head's workers import this checkout, whatever is installed in the environment.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    log = open(root / "head.log", "wb")  # noqa: SIM115 - closed below
    head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _started(root):
            if head.poll() is not None or time.monotonic() > deadline:
                raise Unavailable(f"cannot start a Ray head: {(root / 'head.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        if head.poll() is None:
            head.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started
            try:
                head.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
                head.wait()
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def _started(root: Path) -> bool:
    """Whether the head says it runs (its processes up, the node registered)."""
    try:
        return "Ray runtime started" in (root / "head.log").read_text(errors="replace")
    except OSError:
        return False
