"""service/protocol.py: the job folder's documents survive JSON unchanged, and the worker reads them."""

import json
from pathlib import Path

from ciss_daemon.service.protocol import BatchSpec, JobRequest, JobResult
from ciss_daemon.service.worker import step_request


def _request(tmp_path: Path) -> JobRequest:
    spec = BatchSpec("bikes", str(tmp_path / "bikes"), {1: 3, 2: 0}, "train")
    return JobRequest(
        step_index=1,
        step_sizes=[2, 1],
        class_names={1: "car", 2: "bus", 3: "bicycle"},
        train_batches=[spec],
        eval_batches=[spec, BatchSpec("all", str(tmp_path / "all"), {5: 1}, "eval")],
        memory_batches=[],
        teacher_dir=str(tmp_path / "models" / "v1"),
        workdir=str(tmp_path / "job"),
        output_dir=str(tmp_path / "job" / "candidate"),
        config={"train": {"batch_size": 4}},
        device="cpu",
        ranks=2,
    )


def test_a_request_comes_back_from_json_as_it_went(tmp_path: Path) -> None:
    request = _request(tmp_path)
    text = json.dumps(request.to_json())  # integer keys become strings on the way
    assert JobRequest.from_json(json.loads(text)) == request


def test_a_result_comes_back_from_json_as_it_went() -> None:
    result = JobResult(2, {"miou_all": 0.5}, None, {"model.safetensors": "ab" * 32}, [{"mbce": 0.1}], 7)
    assert JobResult.from_json(json.loads(json.dumps(result.to_json()))) == result


def test_the_worker_turns_a_request_into_the_engines_step_request(tmp_path: Path) -> None:
    step = step_request(_request(tmp_path))
    assert (step.step_index, step.step_sizes, step.device) == (1, [2, 1], "cpu")
    assert step.class_names == {1: "car", 2: "bus", 3: "bicycle"}
    assert [(b.name, b.folder, b.value_map, b.kind) for b in step.eval_batches] == [
        ("bikes", tmp_path / "bikes", {1: 3, 2: 0}, "train"),
        ("all", tmp_path / "all", {5: 1}, "eval"),
    ]
    assert (
        step.teacher_dir == tmp_path / "models" / "v1" and step.output_dir == tmp_path / "job" / "candidate"
    )
