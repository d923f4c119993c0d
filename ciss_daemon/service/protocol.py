"""The job folder: what the daemon and the training child say to each other, and nothing else.

The daemon (``service/jobs.py``) writes ``request.json`` and starts the child (``service/worker.py``); the
child answers with files in the same folder:

- ``progress.json``: phase, iteration, total, epoch, loss terms, images/s, ETA (rewritten atomically);
- ``result.json``: metrics of the candidate and of the current model, file hashes, loss history;
- ``error.txt``: one line saying what went wrong, when it fails;
- ``exit.json``: with several ranks, rank 0's exit code and why (the launcher's own code says less);
- ``candidate/``: the trained model, moved into ``models/`` by the daemon.

Exit codes: 0 done; 75 stopped on SIGTERM after a checkpoint (resume later); 76 another rank died or hung;
1 failed (``error.txt``). Standard library only: the daemon reads these files without importing torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

REQUEST = "request.json"
PROGRESS = "progress.json"
RESULT = "result.json"
ERROR = "error.txt"
EXIT = "exit.json"
CANDIDATE = "candidate"
LOG = "worker.log"

EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_STOPPED = 75  # EX_TEMPFAIL: try again later
EXIT_RANK_LOST = 76  # several ranks: another rank died or hung; retried like a crash


@dataclass(frozen=True)
class BatchSpec:
    """One stored batch a step reads: its folder and how its mask values map to global class ids."""

    name: str
    folder: str
    value_map: dict[int, int]  # mask value -> global class id
    kind: str  # "train" or "eval"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "folder": self.folder, "value_map": self.value_map, "kind": self.kind}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BatchSpec:
        value_map = {int(k): int(v) for k, v in data["value_map"].items()}  # JSON keys are strings
        return cls(data["name"], str(data["folder"]), value_map, data["kind"])


@dataclass
class JobRequest:
    """``request.json``: everything the child needs to train one step, evaluate it and save it.

    Mutable on purpose: under several ranks each rank sets its own ``device`` and share of the batch.
    """

    step_index: int
    step_sizes: list[int]  # classes per step, in order; the last one is this step's
    class_names: dict[int, str]  # global class id -> name
    train_batches: list[BatchSpec]
    eval_batches: list[BatchSpec]
    memory_batches: list[BatchSpec]
    teacher_dir: str | None  # the current model; None at step 0
    workdir: str
    output_dir: str
    config: dict[str, Any]  # EngineConfig.to_dict()
    device: str = "auto"
    ranks: int = 1  # processes that train the step (each rank learns its own from WORLD_SIZE)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("train_batches", "eval_batches", "memory_batches"):
            data[key] = [spec.to_json() for spec in getattr(self, key)]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobRequest:
        def specs(key: str) -> list[BatchSpec]:
            return [BatchSpec.from_json(item) for item in data.get(key, [])]

        return cls(
            step_index=int(data["step_index"]),
            step_sizes=[int(size) for size in data["step_sizes"]],
            class_names={int(k): v for k, v in data["class_names"].items()},
            train_batches=specs("train_batches"),
            eval_batches=specs("eval_batches"),
            memory_batches=specs("memory_batches"),
            teacher_dir=data.get("teacher_dir") or None,
            workdir=data["workdir"],
            output_dir=data["output_dir"],
            config=data["config"],
            device=data.get("device", "auto"),
            ranks=int(data.get("ranks", 1)),
        )


@dataclass(frozen=True)
class JobResult:
    """``result.json``: what a finished job trained, and how the candidate and the current model score."""

    step_index: int
    metrics: dict[str, Any]  # the candidate's (engine.evaluate.Summary.to_dict())
    current_metrics: dict[str, Any] | None  # the current model's on the same data; None at step 0
    files: dict[str, str]  # file name -> sha256 of the candidate's files
    history: list[dict[str, float]] = field(default_factory=list)  # loss terms over the iterations
    train_images: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobResult:
        return cls(
            step_index=int(data["step_index"]),
            metrics=data["metrics"],
            current_metrics=data.get("current_metrics"),
            files=dict(data["files"]),
            history=list(data.get("history") or []),
            train_images=int(data.get("train_images") or 0),
        )
