"""Training a step on a Ray cluster (``daemon.launcher = "ray"``, the ``[ray]`` section of ciss.toml).

The daemon starts this module as its training child, on its own box, as it starts
``torch.distributed.run`` for several local ranks::

    python -m ciss_daemon.service.ray_launch --address HOST:PORT --workers N --gpus-per-worker G \\
        --cpus-per-worker C -m ciss_daemon.service.worker JOB_DIR

This supervisor joins the cluster as a Ray driver, reserves N bundles of ``{CPU: C, GPU: G}`` in one
placement group (all or nothing: no rank waits for a GPU that another job holds), and starts one
:class:`RankAgent` actor per bundle. Each agent starts ``max(G, 1)`` training processes on its node, one
per GPU of its bundle (``LOCAL_RANK`` 0..G-1 over the GPUs Ray gave it in ``CUDA_VISIBLE_DEVICES``), with
the ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` environment that ``torch.distributed`` reads: rank 0's node and a
free port on it. The ranks are the same ``service/worker.py`` as on one box and talk to the daemon through
the same files in the job folder (request, progress, result, checkpoint, exit), which is why the
workspace must be on storage every node mounts at the same path.

Why actors and not Ray Train's ``TorchTrainer``: the worker already owns the step's life cycle (its own
checkpoint file, the stop agreed by all ranks, exit codes that say done / stopped / failed, one progress
file); TorchTrainer would bring a second checkpoint and restart mechanism (``ray.train.report``,
``FailureConfig``) with no way to ask for "checkpoint now and exit 75", and it needs ``ray[train]`` (pandas,
pyarrow). With actors the ranks run the code path the local launchers run, and only Ray core is needed.

Stop: SIGTERM (or SIGINT) to this process, or the daemon's death, sends SIGTERM to every rank on every
node; the ranks agree to stop at one iteration and rank 0 writes the checkpoint; this process exits with
rank 0's code (75). Its exit codes are the worker's; what goes wrong on the Ray side (no head, no room in
the cluster, a node lost) is exit 76 with the reason in ``exit.json``, which the daemon retries from the
checkpoint.

Logs: this supervisor writes to the job's ``worker.log`` (which nodes, which ports); rank r writes to
``worker-rank<r>.log`` in the job folder, on the shared workspace; Ray's own logs stay on each node under
``/tmp/ray/session_latest/logs`` (or the ``--temp-dir`` given to ``ray start``). Nothing here imports Ray
until the supervisor runs: the daemon only checks that it is installed and that the head answers
(:func:`plan_ray_launch`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from ciss_daemon.exceptions import ClusterError
from ciss_daemon.service import worker
from ciss_daemon.settings import RaySettings

log = logging.getLogger("ciss.ray")

RANK_LOG = "worker-rank{rank}.log"
CLUSTER_ENV = "CISS_CLUSTER"  # JSON the ranks copy into progress.json: where the job runs
LAUNCHER_ENV = "CISS_LAUNCHER"  # "ray": a rank's parent is its agent, not the daemon nor torchrun
INSTALL_HINT = "pip install 'ciss[ray]'"
GRACE_SECONDS = 30.0  # beyond the rank timeout, for ranks to notice a lost peer and exit by themselves


@dataclass(frozen=True)
class RayPlan:
    """The Ray side of a :class:`~ciss_daemon.service.launch.Launch`: where and how wide a step trains."""

    address: str
    workers: int
    gpus_per_worker: int
    cpus_per_worker: float
    placement: str
    start_timeout_seconds: float

    @property
    def ranks_per_worker(self) -> int:
        return max(self.gpus_per_worker, 1)

    @property
    def ranks(self) -> int:
        return self.workers * self.ranks_per_worker

    def describe(self) -> str:
        gpus = f"{self.gpus_per_worker} GPU" + ("s" if self.gpus_per_worker != 1 else "")
        each = gpus if self.gpus_per_worker else f"{self.cpus_per_worker:g} CPU (gloo)"
        workers = f"{self.workers} worker" + ("s" if self.workers != 1 else "")
        return f"the Ray cluster at {self.address}: {workers} x {each}"

    def command(self, job_dir: Path, rank_timeout: float) -> tuple[list[str], dict[str, str]]:
        """The supervisor's command line and extra environment for ``job_dir``."""
        command = [
            sys.executable,
            "-m",
            "ciss_daemon.service.ray_launch",
            f"--address={self.address}",
            f"--workers={self.workers}",
            f"--gpus-per-worker={self.gpus_per_worker}",
            f"--cpus-per-worker={self.cpus_per_worker:g}",
            f"--placement={self.placement}",
            f"--start-timeout={self.start_timeout_seconds:g}",
            # The module each rank runs, as torch.distributed.run takes it: the daemon recognises its
            # training processes (and the orphans of an earlier daemon) by this module and job folder.
            "-m",
            "ciss_daemon.service.worker",
            str(job_dir),
        ]
        return command, {"CISS_RANK_TIMEOUT": str(rank_timeout)}


def ray_installed() -> bool:
    return importlib.util.find_spec("ray") is not None


def plan_ray_launch(settings: RaySettings, *, connect_timeout: float = 5.0) -> RayPlan:
    """The plan of ``[ray]``, after checking that Ray is installed and that the head answers.

    Raises :class:`ClusterError` in one line otherwise. ``address = "auto"`` is resolved by Ray in the
    supervisor (the cluster this machine joined with ``ray start``), so only an explicit host:port is
    checked here.
    """
    if not ray_installed():
        raise ClusterError(f'daemon.launcher = "ray" needs Ray, which is not installed: {INSTALL_HINT}')
    if settings.address != "auto":
        head_answers(settings.address, connect_timeout)
    return RayPlan(
        settings.address,
        settings.workers,
        settings.gpus_per_worker,
        settings.cpus_per_worker,
        settings.placement,
        settings.start_timeout_seconds,
    )


def head_answers(address: str, timeout: float) -> None:
    """Raise :class:`ClusterError` unless something accepts connections at the head's ``host:port``."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return
    except OSError as error:
        why = error.strerror or type(error).__name__
    raise ClusterError(
        f"ray.address: no Ray head answers at {address} ({why}); start one there with "
        f"`ray start --head --port={port}` or fix [ray] address in ciss.toml"
    )


# --- on every node: one agent per worker bundle --------------------------------------------------------


class RankAgent:
    """A Ray actor that starts and watches the training processes of one worker bundle on its node."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []
        self.ranks: list[int] = []

    def where(self, want_port: bool) -> dict[str, Any]:
        """This node's address and name, and (rank 0's agent) a free port for the rendezvous."""
        import ray

        found: dict[str, Any] = {"ip": ray.util.get_node_ip_address(), "host": socket.gethostname()}
        if want_port:
            with socket.socket() as s:
                s.bind(("", 0))
                found["port"] = s.getsockname()[1]
        return found

    def start(self, module: str, job_dir: str, first_rank: int, env: dict[str, str]) -> list[int]:
        """Start this bundle's ranks (``LOCAL_WORLD_SIZE`` of them from ``first_rank``); returns pids."""
        local_world = int(env["LOCAL_WORLD_SIZE"])
        for local in range(local_world):
            rank = first_rank + local
            rank_env = {
                **os.environ,
                **env,
                "RANK": str(rank),
                "LOCAL_RANK": str(local),
                # The rank watches this agent: if the agent dies (its driver, the supervisor, is gone),
                # the rank stops after a checkpoint, as a local rank does when the daemon dies.
                "CISS_PARENT_PID": str(os.getpid()),
                LAUNCHER_ENV: "ray",
                "PYTHONUNBUFFERED": "1",
            }
            with open(Path(job_dir) / RANK_LOG.format(rank=rank), "ab") as out:
                self.processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", module, job_dir],
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        env=rank_env,
                        start_new_session=True,
                    )
                )
            self.ranks.append(rank)
        return [p.pid for p in self.processes]

    def poll(self) -> dict[int, int | None]:
        """Rank -> exit code (None while it runs)."""
        return {rank: p.poll() for rank, p in zip(self.ranks, self.processes, strict=True)}

    def signal(self, number: int) -> None:
        """Send ``number`` to every rank of this bundle that still runs."""
        for process in self.processes:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, number)
                except ProcessLookupError:
                    pass


# --- on the daemon's box: the supervisor ----------------------------------------------------------------


class Supervisor:
    """Runs the ranks of one job on the cluster and returns rank 0's exit code."""

    def __init__(
        self, args: argparse.Namespace, should_stop: Callable[[], bool], on_term: Callable[..., None]
    ) -> None:
        self.args = args
        self.on_term = on_term
        self.job_dir = Path(args.job_dir)
        self.should_stop = should_stop
        self.per = max(args.gpus_per_worker, 1)
        self.world = args.workers * self.per

    def run(self) -> int:
        if self.args.address != "auto":
            # ray.init retries an absent head for minutes, deaf to a stop: ask the port first.
            try:
                head_answers(self.args.address, 5.0)
            except ClusterError as error:
                return self.lost(str(error))
        try:
            import ray
        except ImportError:
            return self.lost(
                f'daemon.launcher = "ray" needs Ray, which is not installed here: {INSTALL_HINT}'
            )
        try:
            ray.init(
                address=self.args.address,
                namespace="ciss",
                log_to_driver=False,  # each rank has its own log file in the job folder
                logging_level=logging.WARNING,
                runtime_env=_runtime_env(),
            )
        except (ConnectionError, RuntimeError, ValueError) as error:
            return self.lost(
                f"cannot join the Ray cluster at {self.args.address} ({_first_line(error)}); start its head "
                "with `ray start --head` or fix [ray] address in ciss.toml"
            )
        for number in (signal.SIGTERM, signal.SIGINT):  # ours again, whatever the driver set up
            signal.signal(number, self.on_term)
        try:
            return self._run(ray)
        finally:
            ray.shutdown()

    def _run(self, ray: Any) -> int:
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = {"CPU": float(self.args.cpus_per_worker)}
        if self.args.gpus_per_worker:
            bundle["GPU"] = float(self.args.gpus_per_worker)
        group = placement_group([bundle] * self.args.workers, strategy=self.args.placement.upper())
        try:
            if not self._wait(ray, group.ready(), self.args.start_timeout):
                if self.should_stop():
                    return worker.EXIT_STOPPED
                free = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
                return self.lost(
                    f"the Ray cluster at {self.args.address} had no room for {self.args.workers} workers of "
                    f"{_resources(bundle)} within {self.args.start_timeout:g} s (free now: "
                    f"{_resources(free)}); add nodes or lower [ray] workers, gpus_per_worker or "
                    "cpus_per_worker"
                )
            agent_class = ray.remote(RankAgent)
            agents = [
                agent_class.options(
                    num_cpus=bundle["CPU"],
                    num_gpus=bundle.get("GPU", 0),
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        group, placement_group_bundle_index=index
                    ),
                ).remote()
                for index in range(self.args.workers)
            ]
            return self._train(ray, agents)
        except ray.exceptions.RayError as error:  # an agent that cannot start, or its node lost
            return self.lost(f"a Ray worker of this step failed ({_first_line(error)})")
        finally:
            remove_placement_group(group)

    def _train(self, ray: Any, agents: list[Any]) -> int:
        places = ray.get([agent.where.remote(index == 0) for index, agent in enumerate(agents)])
        # As written in [ray] address; "auto" is what Ray found (the head's address as its nodes see it).
        address = self.args.address if self.args.address != "auto" else ray.get_runtime_context().gcs_address
        nodes = sorted({f"{p['host']} ({p['ip']})" for p in places})
        cluster = {"launcher": "ray", "address": address, "nodes": nodes, "workers": len(agents)}
        env = {
            "WORLD_SIZE": str(self.world),
            "LOCAL_WORLD_SIZE": str(self.per),
            "MASTER_ADDR": places[0]["ip"],
            "MASTER_PORT": str(places[0]["port"]),
            "CISS_RANK_TIMEOUT": os.environ.get("CISS_RANK_TIMEOUT", "300"),
            CLUSTER_ENV: json.dumps(cluster),
        }
        for index, place in enumerate(places):
            ranks = f"{index * self.per}-{index * self.per + self.per - 1}" if self.per > 1 else index
            log.info("worker %d on %s (%s): rank %s", index, place["host"], place["ip"], ranks)
        log.info(
            "Ray cluster at %s; rank logs: %s; Ray's own logs: session_latest/logs in Ray's temporary "
            "folder on each node (/tmp/ray by default)",
            address,
            self.job_dir / RANK_LOG.format(rank="N"),
        )
        if self.should_stop():  # before any rank started: nothing to checkpoint
            return worker.EXIT_STOPPED
        ray.get(
            [
                agent.start.remote(self.args.module, str(self.job_dir), index * self.per, env)
                for index, agent in enumerate(agents)
            ]
        )
        return self._watch(ray, agents, places)

    def _watch(self, ray: Any, agents: list[Any], places: list[dict[str, Any]]) -> int:
        """Poll the ranks until all have exited; forward a stop; end the attempt if a node is lost."""
        stopping = False
        first_exit: float | None = None
        patience = float(os.environ.get("CISS_RANK_TIMEOUT", "300")) + GRACE_SECONDS
        while True:
            try:
                codes: dict[int, int | None] = {}
                for found in ray.get([agent.poll.remote() for agent in agents]):
                    codes.update({int(rank): code for rank, code in found.items()})
            except ray.exceptions.RayActorError as error:
                self._signal_all(ray, agents, signal.SIGKILL)  # the survivors' ranks: they cannot finish
                return self.lost(f"a Ray worker of this step was lost ({_first_line(error)})")
            if all(code is not None for code in codes.values()):
                return self._rank0_code(cast(int, codes[0]), places[0])  # every code is set here
            if self.should_stop() and not stopping:
                stopping = True
                log.info("stopping: every rank checkpoints at the same iteration")
                self._signal_all(ray, agents, signal.SIGTERM)
            if first_exit is None and any(code not in (None, 0) for code in codes.values()):
                first_exit = time.monotonic()
            if first_exit is not None and time.monotonic() - first_exit > patience:
                # A rank that exited leaves the others in a collective until the rank timeout; past it and
                # a grace, nothing is left to wait for.
                self._signal_all(ray, agents, signal.SIGKILL)
            time.sleep(0.5)

    def _signal_all(self, ray: Any, agents: list[Any], number: int) -> None:
        try:
            ray.get([agent.signal.remote(number) for agent in agents], timeout=30)
        except Exception as error:  # a lost agent's ranks die with it (parent-death signal)
            log.warning("could not signal every rank (%s)", _first_line(error))

    def _rank0_code(self, code: int, place: dict[str, Any]) -> int:
        if code >= 0:
            return code
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        return self.lost(f"training rank 0 on {place['host']} was killed by {name}")

    def lost(self, reason: str) -> int:
        """End the attempt on the Ray side's account: the daemon retries it from the checkpoint."""
        log.error("%s", reason)
        worker.write_json(self.job_dir / worker.EXIT, {"code": worker.EXIT_RANK_LOST, "reason": reason})
        return worker.EXIT_RANK_LOST

    def _wait(self, ray: Any, ref: Any, timeout: float) -> bool:
        """Wait for ``ref`` up to ``timeout`` seconds; False on timeout or a stop."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.should_stop():
            ready, _ = ray.wait([ref], timeout=1.0)
            if ready:
                return True
        return False


def _runtime_env() -> dict[str, Any]:
    """The supervisor's ``PYTHONPATH`` for the agents, so that every node imports the same ciss code."""
    path = os.environ.get("PYTHONPATH")
    return {"env_vars": {"PYTHONPATH": path}} if path else {}


def _resources(resources: dict[str, float]) -> str:
    return ", ".join(f"{value:g} {name}" for name, value in sorted(resources.items())) or "none"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ciss_daemon.service.ray_launch",
        description="Train one step on a Ray cluster (the daemon starts this; see service/ray_launch.py).",
    )
    parser.add_argument("--address", required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--gpus-per-worker", type=int, default=0)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--placement", default="pack")
    parser.add_argument("--start-timeout", type=float, default=600.0)
    parser.add_argument("-m", dest="module", required=True)
    parser.add_argument("job_dir")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = {"requested": False}

    def on_term(signum: int, frame: Any) -> None:  # a handler only sets a flag (STYLE item 7)
        stop["requested"] = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    parent = int(os.environ.get("CISS_PARENT_PID", "0"))
    worker._die_with_parent()

    def should_stop() -> bool:
        return stop["requested"] or (parent != 0 and os.getppid() != parent)

    return Supervisor(args, should_stop, on_term).run()


if __name__ == "__main__":
    sys.exit(main())
