"""How many training processes a step gets, on which devices, and the command that starts them.

One process (``python -m ciss_daemon.service.worker JOB_DIR``) trains on one device. With several GPUs
(``daemon.gpus``) or several CPU ranks (``daemon.cpu_ranks``), the daemon starts the same worker under
``python -m torch.distributed.run``: one process per GPU, NCCL between GPUs and gloo between CPU
processes, ``train.batch_size`` split evenly over them (see ``service/worker.py``). Nothing here imports
torch: the GPUs are counted from ``CUDA_VISIBLE_DEVICES`` or the NVIDIA driver's ``/proc`` entries.
With ``daemon.launcher = "ray"`` the same ranks run on a Ray cluster instead (``service/ray_launch.py``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ciss_daemon.exceptions import SettingsError
from ciss_daemon.settings import DaemonSettings, RaySettings

if TYPE_CHECKING:
    from ciss_daemon.service.ray_launch import RayPlan

NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")


@dataclass(frozen=True)
class Launch:
    """The training processes of one step.

    ``device``: the device of a single process, or "cuda"/"cpu" for several ranks (rank r takes
    ``cuda:r`` of ``cuda_visible``). ``cuda_visible``: the GPUs the ranks see (``CUDA_VISIBLE_DEVICES``),
    None to leave the variable as it is. ``ray``: the ranks run on a Ray cluster, not on this box.
    """

    ranks: int
    device: str
    cuda_visible: str | None = None
    timeout_seconds: float = 300.0
    ray: RayPlan | None = None

    def describe(self) -> str:
        if self.ray is not None:
            return f"{self.ranks} process{'es' if self.ranks != 1 else ''} on {self.ray.describe()}"
        if self.ranks == 1:
            return f"1 process on {self.device}"
        where = f"GPUs {self.cuda_visible}" if self.device == "cuda" else "the CPU (gloo)"
        return f"{self.ranks} processes on {where}"


def visible_gpus() -> list[str]:
    """The GPUs a training process would see, as ``CUDA_VISIBLE_DEVICES`` entries (indices or UUIDs)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [entry.strip() for entry in listed.split(",") if entry.strip() and entry.strip() != "-1"]
    try:
        return [str(i) for i in range(len(list(NVIDIA_GPUS.iterdir())))]
    except OSError:  # no NVIDIA driver
        return []


def plan_launch(
    daemon: DaemonSettings, gpus: list[str] | None = None, ray: RaySettings | None = None
) -> Launch:
    """The processes ``daemon.device``, ``daemon.gpus`` and ``daemon.cpu_ranks`` ask for on this box.

    ``cuda:N`` names one GPU and wins over ``gpus``. ``auto`` without a GPU trains on the CPU. Raises
    :class:`SettingsError` when ``gpus`` asks for GPUs that are not there. With ``daemon.launcher = "ray"``
    the ``ray`` section decides instead (:class:`ClusterError` when Ray or its head is missing).
    """
    timeout = daemon.rank_timeout_seconds
    if daemon.launcher == "ray":
        from ciss_daemon.service.ray_launch import plan_ray_launch

        plan = plan_ray_launch(ray or RaySettings())
        return Launch(plan.ranks, "cuda" if plan.gpus_per_worker else "cpu", None, timeout, plan)
    cpu = Launch(daemon.cpu_ranks, "cpu", None, timeout)
    if daemon.device == "cpu" or daemon.device.startswith("cuda:"):
        return cpu if daemon.device == "cpu" else Launch(1, daemon.device, None, timeout)
    gpus = visible_gpus() if gpus is None else gpus
    if not gpus:
        # "cuda" without a GPU: one process, which reports the missing device in one line.
        return cpu if daemon.device == "auto" else Launch(1, "cuda", None, timeout)
    wanted = daemon.gpu_request()
    if isinstance(wanted, str):  # "all"
        chosen = list(range(len(gpus)))
    elif isinstance(wanted, int):
        if wanted > len(gpus):
            raise SettingsError(
                f'daemon.gpus: {wanted} GPUs asked for but {len(gpus)} visible; use "all" or at most '
                f"{len(gpus)}"
            )
        chosen = list(range(wanted))
    else:
        missing = [i for i in wanted if i >= len(gpus)]
        if missing:
            raise SettingsError(
                f"daemon.gpus: GPU {missing[0]} is not visible (indices 0 to {len(gpus) - 1} are); "
                "fix the list"
            )
        chosen = list(wanted)
    if len(chosen) == 1:
        # One GPU: a plain process on it, as with device = "cuda:N" (indices count the visible GPUs).
        return Launch(1, f"cuda:{chosen[0]}", None, timeout)
    return Launch(len(chosen), "cuda", ",".join(gpus[i] for i in chosen), timeout)


def worker_command(job_dir: Path, launch: Launch) -> tuple[list[str], dict[str, str]]:
    """The command line and extra environment that start the worker(s) of ``job_dir``."""
    if launch.ray is not None:
        return launch.ray.command(job_dir, launch.timeout_seconds)
    if launch.ranks == 1:
        return [sys.executable, "-m", "ciss_daemon.service.worker", str(job_dir)], {}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        # One box: a private rendezvous on a free local port, so two daemons never meet.
        "--standalone",
        f"--nproc-per-node={launch.ranks}",
        # A rank that fails ends the attempt; the daemon retries from the checkpoint, not torchrun.
        "--max-restarts=0",
        "-m",
        "ciss_daemon.service.worker",
        str(job_dir),
    ]
    env = {"CISS_RANK_TIMEOUT": str(launch.timeout_seconds)}
    if launch.cuda_visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = launch.cuda_visible
    return command, env
