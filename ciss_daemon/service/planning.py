"""From catalog rows to what the engine needs: a step's training request, evaluation sets, report data.

The daemon builds a worker's ``request.json`` here; ``ciss eval`` and ``ciss report`` use the same
evaluation sets, so a number in the report is the number the gate saw. Nothing here imports torch at
module level.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from ciss_daemon.catalog import records as catalog
from ciss_daemon.catalog.tables import Batch, Job, Step, StepState
from ciss_daemon.exceptions import CissError
from ciss_daemon.service.protocol import CANDIDATE, BatchSpec, JobRequest
from ciss_daemon.settings import Settings


def batch_ref(batch: Batch, ids: dict[str, int]) -> BatchSpec:
    """One batch as a job reads it, its mask values mapped by class name to the model's ids. Classes the
    model does not know (not yet taught, or taught after it) are background, as docs/method.md masks unseen
    classes."""
    value_map = {int(v): ids.get(name, 0) for v, name in batch.class_names.items()}
    return BatchSpec(batch.name, batch.store_path, value_map, batch.kind)


def step_sizes(classes: list[tuple[int, str, int]]) -> list[int]:
    """Classes per step, in order, from a ``class_map`` (ids are contiguous per step)."""
    sizes: list[int] = []
    last = None
    for _, _, index in classes:
        if index != last:
            sizes.append(0)
            last = index
        sizes[-1] += 1
    return sizes


def lineage(s: Session, before: int) -> list[Step]:
    """The promoted steps before step index ``before``: the model's history."""
    query = select(Step).where(Step.index < before, Step.state == StepState.PROMOTED).order_by(Step.index)
    return list(s.scalars(query))


def eval_refs(s: Session, steps: list[Step], ids: dict[str, int]) -> list[BatchSpec]:
    """Held-out data of ``steps`` and every evaluation batch."""
    evals = s.scalars(select(Batch).where(Batch.kind == "eval").order_by(Batch.id))
    return [batch_ref(st.batch, ids) for st in steps] + [batch_ref(b, ids) for b in evals]


def build_request(s: Session, step: Step, job: Job, settings: Settings) -> JobRequest:
    """The worker's request.json: the step's data, every held-out set so far, the teacher, the settings.

    Build it in the same transaction that starts the job: the ids of a waiting step's classes may move
    while an earlier step is released (see ``catalog._compact_class_ids``).
    """
    classes = catalog.class_map(session=s, upto_step=step.index)
    sizes = step_sizes(classes)
    ids = {name: cid for cid, name, _ in classes}
    history = lineage(s, step.index)
    current = catalog.current_version(session=s)
    assert job.workdir is not None  # create_job gives every job its folder
    return JobRequest(
        step_index=len(sizes) - 1,
        step_sizes=sizes,
        class_names={cid: name for cid, name, _ in classes},
        train_batches=[batch_ref(step.batch, ids)],
        eval_batches=eval_refs(s, [*history, step], ids),
        memory_batches=[batch_ref(p.batch, ids) for p in history],
        teacher_dir=current.path if current is not None and len(sizes) > 1 else None,
        workdir=job.workdir,
        output_dir=str(Path(job.workdir) / CANDIDATE),
        config=settings.engine.to_dict(),
        device=settings.daemon.device,
    )


def training_window(expression: str) -> Any:
    """The cron trigger of ``daemon.training_window`` (in UTC), or None when training may start any time."""
    if not expression:
        return None
    from apscheduler.triggers.cron import CronTrigger

    return CronTrigger.from_crontab(expression, timezone=dt.UTC)


def next_opening(window: Any, now: dt.datetime | float) -> dt.datetime | None:
    """None when the training window is open at ``now`` (or there is none); else when it opens next (UTC).

    The window is a set of whole minutes: it is open when the trigger fires in the current minute. The
    daemon passes its clock's datetime; ``ciss status`` still passes seconds since the epoch.
    """
    if window is None:
        return None
    at = now if isinstance(now, dt.datetime) else dt.datetime.fromtimestamp(now, dt.UTC)
    minute = at.astimezone(dt.UTC).replace(second=0, microsecond=0)
    fire = window.get_next_fire_time(None, minute)
    if fire is not None and fire <= minute:
        return None
    # Never: a window such as Feb 30th; far enough to read as "never" and still a datetime.
    return fire or dt.datetime.max.replace(tzinfo=dt.UTC)


def evaluate_version(
    factory: sessionmaker[Session],
    model_dir: Path,
    settings: Settings,
    *,
    folder: Path | None = None,
    starting: Callable[[str], None] | None = None,
) -> tuple[Any, dict, dict[str, Any]]:
    """``ciss eval``: metrics of the model in ``model_dir`` on every held-out set of its classes' steps, or
    on the batch ``folder``; also what was evaluated (model, images, sets), said first to ``starting``.

    Old classes are those of every step before the model's last one, new classes those of its last step.
    """
    from engine.data import read_manifest
    from engine.runner import BatchRef, eval_groups, evaluate_model, load_model, resolve_device

    device = resolve_device(settings.daemon.device)
    model, meta = load_model(model_dir, device)
    names = {c["id"]: c["name"] for c in meta["classes"]}
    last_step = max(c["step"] for c in meta["classes"])
    if folder is None:
        with factory() as s:
            refs = eval_refs(s, steps_teaching(s, list(names.values())), {n: i for i, n in names.items()})
        batches = [BatchRef(r.name, Path(r.folder), r.value_map, r.kind) for r in refs]
    else:
        manifest = read_manifest(folder)
        ids = {n: i for i, n in names.items()}
        # Values of classes the model does not know are left out of the map, so they are ignored.
        value_map = {v: ids[n] for v, n in manifest.classes.items() if n in ids}
        batches = [BatchRef(manifest.name, Path(folder), value_map, manifest.kind)]
    groups = eval_groups(batches)
    counts = {name: len(dataset) for name, _, dataset in groups}
    scope = {"model": model_dir.name, "images": sum(counts.values()), "sets": counts}
    if not scope["images"]:
        where = f"batch {folder}" if folder is not None else "the steps of this model"
        raise CissError(
            f"no held-out images in {where}: a training batch is evaluated on its val/ folder; add one, "
            'or mark a fully labelled folder kind = "eval" in batch.toml'
        )
    if starting is not None:
        starting(f"evaluating {scope['model']} on {scope['images']} images of {len(counts)} sets")
    new = [c["id"] for c in meta["classes"] if c["step"] == last_step]
    old = [c["id"] for c in meta["classes"] if c["step"] != last_step] or new
    metrics = evaluate_model(
        model,
        groups,
        num_classes=model.num_classes,
        old_classes=old,
        new_classes=new if last_step > 0 else [],
        device=device,
        base_classes=[c["id"] for c in meta["classes"] if c["step"] == 0],
    )
    return metrics, names, scope


def class_colours(factory: sessionmaker[Session]) -> dict[str, tuple[int, int, int]]:
    """Class name -> RGB from the [colors] tables of the stored batches (the first batch naming a class)."""
    from engine.batch_format import manifest_colours

    with factory() as s:
        folders = [Path(p) for p in s.scalars(select(Batch.store_path).order_by(Batch.id))]
    colours: dict[str, tuple[int, int, int]] = {}
    for folder in folders:
        for name, rgb in manifest_colours(folder).items():
            colours.setdefault(name, rgb)
    return colours


def steps_teaching(s: Session, names: list[str]) -> list[Step]:
    """The steps whose batches declare any of ``names``, in order: a model's history, found by its classes."""
    wanted = set(names)
    steps = [
        b.step
        for b in s.scalars(select(Batch).where(Batch.kind == "train"))
        # A failed or discarded step's batch may declare a name a later step taught: skip it.
        if b.step is not None
        and b.step.state not in (StepState.FAILED, StepState.DISCARDED)
        and wanted & set(b.class_names.values())
    ]
    return sorted(steps, key=lambda st: st.index)


def report_data(ws: Any, factory: sessionmaker[Session], *, samples: int = 4) -> Any:
    """``ciss report``: metrics and loss curves of every step's model, plus sample predictions."""
    from ciss_daemon.outputs.report import ReportData, StepReport, distinct_pairs, sample_predictions
    from ciss_daemon.service.promotion import resolve_current

    with factory() as s:
        names = {cid: name for cid, name, _ in catalog.class_map(session=s, upto_step=10**9)}
        steps = []
        for step in s.scalars(select(Step).order_by(Step.index)):
            versions = sorted(step.versions, key=lambda v: v.id)
            version = versions[-1] if versions else None
            metrics = (version.metrics or {}) if version is not None else {}
            steps.append(
                StepReport(
                    index=step.index,
                    version=version.version if version else None,
                    state=step.state,
                    metrics=metrics.get("candidate"),
                    history=metrics.get("history") or [],
                )
            )
        current = catalog.current_version(session=s)
        pairs: list[tuple[Path, Path, dict[int, int]]] = []
        if current is not None:
            taught = {
                name: cid for cid, name, _ in catalog.class_map(session=s, upto_step=current.step.index)
            }
            for ref in eval_refs(s, steps_teaching(s, list(taught)), taught):
                folder = Path(ref.folder)
                split = folder if ref.kind == "eval" else folder / "val"
                value_map = ref.value_map
                for mask in sorted((split / "masks").glob("*.png"))[:samples]:
                    image = next((p for p in (split / "images").glob(f"{mask.stem}.*")), None)
                    if image is not None:
                        pairs.append((image, mask, value_map))
    model_dir = resolve_current(ws.models)
    pairs = distinct_pairs(pairs)
    picked = pairs[:: max(1, len(pairs) // samples)][:samples] if pairs else []
    shown = sample_predictions(model_dir, picked, samples) if model_dir is not None and picked else []
    return ReportData(
        class_names=names,
        steps=steps,
        samples=shown,
        title=f"ciss report: {ws.root}",
        colours=class_colours(factory),
    )
