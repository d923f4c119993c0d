"""``/metrics``: the workspace in Prometheus' text format, read from the catalog at each scrape.

A custom collector on its own registry: every value is read when Prometheus asks, from the same snapshot
``ciss status`` shows, so the numbers never drift from the catalog and nothing is kept between scrapes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from ciss_daemon import status
from ciss_daemon.catalog.connection import session_reader
from ciss_daemon.catalog.tables import STEP_STATES, Rejection, Step, StepState
from ciss_daemon.web.polling import running
from ciss_daemon.workspace import Workspace


def _timestamp(iso: str | None) -> float | None:
    return None if iso is None else dt.datetime.fromisoformat(iso).timestamp()


class CatalogCollector(Collector):
    """Steps by state, the running job, the last promotion, rejections, and whether the daemon is up."""

    def __init__(self, ws: Workspace, factory: sessionmaker[Session]) -> None:
        self.ws = ws
        self.factory = factory

    def collect(self) -> Iterator[Metric]:
        with self.factory() as s:
            data = status.snapshot(self.ws, session_reader(s))
            job = running(self.ws, s)
            rejections = s.scalar(select(func.count(Rejection.id))) or 0
            held_since = s.scalar(select(func.min(Step.updated_at)).where(Step.state == StepState.HELD))
        yield from self._daemon(data)
        yield from self._steps(data, held_since)
        yield from self._job(job)
        yield from self._model(data)
        total = CounterMetricFamily("ciss_rejections", "Batches rejected since the workspace was made.")
        total.add_metric([], rejections)
        yield total

    def _daemon(self, data: dict[str, Any]) -> Iterator[Metric]:
        up = GaugeMetricFamily("ciss_daemon_up", "1 while a ciss daemon holds the workspace's lock.")
        up.add_metric([], 1 if data["daemon"]["alive"] else 0)
        yield up

    def _steps(self, data: dict[str, Any], held_since: dt.datetime | None) -> Iterator[Metric]:
        steps = GaugeMetricFamily("ciss_steps", "Steps in the catalog by state.", labels=["state"])
        for state in STEP_STATES:
            steps.add_metric([state], data["counts"].get(state, 0))
        yield steps
        held = GaugeMetricFamily(
            "ciss_held_step_since_timestamp_seconds",
            "When the longest-waiting held step was held (absent when none is held).",
        )
        if held_since is not None:
            held.add_metric([], held_since.timestamp())
        yield held
        queued = GaugeMetricFamily("ciss_queue_length", "Steps waiting to train.")
        queued.add_metric([], len(data["queue"]))
        yield queued

    def _job(self, job: dict[str, Any] | None) -> Iterator[Metric]:
        job = job or {}
        fields = (
            ("ciss_job_running", "1 while a training job runs.", 1 if job else 0),
            ("ciss_job_step", "Step index of the running job.", job.get("step")),
            ("ciss_job_iteration", "Iterations done by the running job.", job.get("iteration")),
            ("ciss_job_iterations_total", "Iterations the running job will do.", job.get("total")),
            ("ciss_job_progress_ratio", "Fraction of the running job done, 0..1.", job.get("fraction")),
            (
                "ciss_job_images_per_second",
                "Images per second of the running job.",
                job.get("images_per_second"),
            ),
            ("ciss_job_eta_seconds", "Estimated seconds left.", job.get("eta_seconds")),
        )
        for name, text, value in fields:
            metric = GaugeMetricFamily(name, text)
            if value is not None:
                metric.add_metric([], value)
            yield metric

    def _model(self, data: dict[str, Any]) -> Iterator[Metric]:
        current = data["current"]
        info = GaugeMetricFamily(
            "ciss_current_model_info", "The current model (value 1).", labels=["version", "step"]
        )
        number = GaugeMetricFamily("ciss_current_model_version", "Number of the current model (v0003: 3).")
        when = GaugeMetricFamily(
            "ciss_last_promotion_timestamp_seconds", "When the current model was promoted (Unix time)."
        )
        miou = GaugeMetricFamily(
            "ciss_current_model_miou", "mIoU of the current model, gate's grouping.", labels=["classes"]
        )
        if current is not None:
            info.add_metric([current["version"], str(current["step"])], 1)
            number.add_metric([], int(current["version"].lstrip("v")))
            promoted = _timestamp(current["promoted_at"])
            if promoted is not None:
                when.add_metric([], promoted)
            for key, label in (("miou_all", "all"), ("miou_old", "old"), ("miou_new", "new"), ("hiou", "h")):
                if current["metrics"].get(key) is not None:
                    miou.add_metric([label], current["metrics"][key])
        yield from (info, number, when, miou)


def registry(ws: Workspace, factory: sessionmaker[Session]) -> CollectorRegistry:
    """A registry holding only the catalog's collector (no process metrics of whoever serves it)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(CatalogCollector(ws, factory))
    return reg


def exposition(reg: CollectorRegistry) -> bytes:
    return generate_latest(reg)
