"""Sample predictions of the current model for the dashboard, drawn in a child process.

Predicting needs torch, which the dashboard never imports: :func:`request` starts
``python -m ciss_daemon.web.samples WORKSPACE`` once per model version, which writes, per held-out sample,
``N.image.png``, ``N.truth.png`` and ``N.prediction.png`` (colours of ``ciss predict``) into
``web-samples/<version>/`` of the workspace, through a hidden folder renamed when complete. The dashboard
shows what is there and serves nothing else from that folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ciss_daemon.workspace import Workspace

FOLDER = "web-samples"
SAMPLES = 4
RETRY_SECONDS = 300.0  # a failed drawing (e.g. a model being promoted meanwhile) is tried again after this

_started: dict[tuple[Path, str], tuple[subprocess.Popen[bytes], float]] = {}


def folder(ws: Workspace) -> Path:
    return ws.root / FOLDER


def request(ws: Workspace, version: str) -> None:
    """Start drawing the samples of ``version`` unless they exist or a drawing is under way (never waits)."""
    if (folder(ws) / version).is_dir() or not (ws.models / version).is_dir():
        return  # drawn already, or no model files to draw with
    key = (ws.root, version)
    previous = _started.get(key)
    if previous is not None:
        process, started = previous
        if process.poll() is None or time.monotonic() - started < RETRY_SECONDS:
            return
    try:
        folder(ws).mkdir(exist_ok=True)
        log = open(folder(ws) / "samples.log", "ab")  # noqa: SIM115 - the child's stdout; closed below
    except OSError:  # a read-only workspace: the dashboard then shows no samples
        return
    with log:
        process = subprocess.Popen(
            [sys.executable, "-m", "ciss_daemon.web.samples", str(ws.root)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _started[key] = (process, time.monotonic())


def draw(ws: Workspace, samples: int = SAMPLES) -> Path | None:
    """Write the current model's sample predictions; returns their folder, None without a current model."""
    import numpy as np
    from PIL import Image

    from ciss_daemon.catalog import connection
    from ciss_daemon.outputs.predict import colour_mask, palette
    from ciss_daemon.service.planning import report_data
    from ciss_daemon.service.promotion import resolve_current
    from ciss_daemon.settings import load_settings

    model_dir = resolve_current(ws.models)
    if model_dir is None:
        return None
    settings = load_settings(ws.settings_path)
    url = ws.catalog_url(settings)
    factory = connection.session_factory(connection.make_engine(url, read_only=True))
    data = report_data(ws, factory, samples=samples)
    colours = palette(max(data.class_names, default=0))
    target = folder(ws) / model_dir.name
    partial = folder(ws) / f".{model_dir.name}.{os.getpid()}"
    partial.mkdir(parents=True, exist_ok=True)
    for n, (image, truth, prediction) in enumerate(data.samples):
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(partial / f"{n}.image.png")
        colour_mask(truth, colours).save(partial / f"{n}.truth.png")
        colour_mask(prediction, colours).save(partial / f"{n}.prediction.png")
    if target.exists():
        shutil.rmtree(partial)
    else:
        partial.rename(target)
    return target


def main() -> None:
    draw(Workspace(Path(sys.argv[1]).resolve()))


if __name__ == "__main__":
    main()
