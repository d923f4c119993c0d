"""Training checkpoints and saved models, written atomically and loaded without running foreign code.

A training checkpoint is one ``torch.save`` file holding only tensors, containers and plain scalars, so
that ``torch.load(weights_only=True)`` can always read it back; anything else is refused when saving.
A saved model is a directory with ``model.safetensors`` (the weights) and ``model.json`` (settings, class
map, step sizes and the weights' sha256), which other programs read without this package.
Every file is written to a temporary name, fsynced and renamed, so a crash leaves the old file or the new
one, never a mix.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import Tensor

from engine.atomic import write_bytes
from engine.exceptions import CheckpointError

MODEL_FILE = "model.safetensors"
META_FILE = "model.json"
MODEL_FORMAT = "ciss-model"
MODEL_FORMAT_VERSION = 1
# Keys of model.json written by save_model itself; the caller's meta may not use them.
_RESERVED_META_KEYS = ("format", "format_version", "weights_sha256")

# torch.load reads these variables at every call; they are changed only while the lock is held.
_TORCH_LOAD_ENV_LOCK = threading.Lock()


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's content, read in chunks so that large weights need little memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_safe(value: Any, where: str) -> None:
    """Raise unless ``value`` is made only of what ``torch.load(weights_only=True)`` reads back."""
    # Exact types: subclasses (numpy.float64 is a float, defaultdict a dict) pickle as their own class.
    if value is None or type(value) in (bool, int, float, str, Tensor, torch.nn.Parameter):
        return
    if type(value) in (dict, OrderedDict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise CheckpointError(f"checkpoint entry {where}: key {key!r} is not a str or int")
            _check_safe(item, f"{where}[{key!r}]")
        return
    if type(value) in (list, tuple):
        for index, item in enumerate(value):
            _check_safe(item, f"{where}[{index}]")
        return
    hint = (
        " (convert it with torch.from_numpy or .tolist())"
        if isinstance(value, (np.ndarray, np.generic))
        else ""
    )
    raise CheckpointError(
        f"checkpoint entry {where} is a {type(value).__module__}.{type(value).__qualname__}, which a safe "
        f"load cannot read back; store tensors, dicts, lists, tuples, str, int, float, bool or None{hint}"
    )


def save_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    """Write a training checkpoint atomically, after checking it holds only safely loadable values.

    ``state`` holds tensors, nested dicts, lists and tuples, and str/int/float/bool/None: model, optimizer,
    scheduler and GradScaler state dicts, :func:`rng_state`, the position and the settings.
    """
    path = Path(path)
    _check_safe(dict(state), "state")
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(path, buffer.getvalue())
    except OSError as error:
        raise CheckpointError(
            f"could not write checkpoint {path}: {error}; check free disk space and permissions"
        ) from error


def _load_weights_only(source: Any, map_location: str | torch.device) -> Any:
    """``torch.load(weights_only=True)`` that environment variables cannot turn into an unsafe load.

    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD asks torch to unpickle arbitrary objects; depending on the torch
    version it overrides even an explicit ``weights_only=True``. It is removed, and
    TORCH_FORCE_WEIGHTS_ONLY_LOAD set, for the duration of the call, then both are restored.
    """
    with _TORCH_LOAD_ENV_LOCK:
        saved = {
            name: os.environ.get(name)
            for name in ("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_WEIGHTS_ONLY_LOAD")
        }
        os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
        os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
        try:
            return torch.load(source, map_location=map_location, weights_only=True)
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, never executing code stored in it."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            # torch.save always writes a zip archive; anything else would reach torch's legacy reader.
            is_archive = zipfile.is_zipfile(handle)
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint {path} does not exist; start the job from scratch or give the right path"
        ) from None
    except OSError as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error}; check its permissions") from error
    corrupt = (
        f"checkpoint {path} is truncated or corrupt; delete it to restart the job from its previous "
        "checkpoint or from scratch"
    )
    if not is_archive:
        raise CheckpointError(corrupt)
    try:
        state = _load_weights_only(path, map_location)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"checkpoint {path} holds objects other than tensors and plain values and was refused as unsafe; "
            "it was not written by ciss: delete it and restart the job"
        ) from error
    except Exception as error:  # torch reports damaged archives with several exception types
        raise CheckpointError(f"{corrupt} ({type(error).__name__})") from error
    if not isinstance(state, dict):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(state).__name__}, not a dict of training state; delete it"
        )
    return state


def rng_state() -> dict[str, Any]:
    """Every random generator training draws from, as tensors and plain values a safe load reads back."""
    version, mt_state, gauss_next = random.getstate()
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {
            "version": version,
            "state": torch.tensor(mt_state, dtype=torch.int64),
            "gauss": gauss_next,
        },
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore generators saved by :func:`rng_state`; CUDA states are set for the devices present."""
    torch.set_rng_state(state["torch"].cpu())
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].cpu().numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    if torch.cuda.is_available() and "cuda" in state:
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), device)


def _plain_tensors(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """CPU, contiguous tensors that share no memory, as safetensors requires."""
    tensors: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen:  # tied weights: each name gets its own copy
            tensor = tensor.clone()
        elif pointer:
            seen.add(pointer)
        tensors[name] = tensor
    return tensors


def save_model(directory: Path, state_dict: Mapping[str, Tensor], meta: Mapping[str, Any]) -> dict[str, str]:
    """Write ``model.safetensors`` and ``model.json`` into ``directory``; return ``{file name: sha256}``.

    ``meta`` (settings, class map ``[{id, name, step}]``, step sizes, ...) must be JSON-serialisable; the
    format version and the sha256 of the weights are added to it in model.json.
    """
    directory = Path(directory)
    reserved = [key for key in _RESERVED_META_KEYS if key in meta]
    if reserved:
        raise CheckpointError(f"model meta for {directory} may not set {reserved}: save_model writes them")
    weights = safetensors.torch.save(
        _plain_tensors(state_dict),
        metadata={"format": MODEL_FORMAT, "format_version": str(MODEL_FORMAT_VERSION)},
    )
    weights_sha256 = hashlib.sha256(weights).hexdigest()
    document = {
        **meta,
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "weights_sha256": weights_sha256,
    }
    try:
        meta_bytes = json.dumps(document, indent=2, sort_keys=True, allow_nan=False).encode()
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"model meta for {directory} is not plain JSON ({error})") from error
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # Weights first: after a crash in between, model.json is missing or records another hash,
        # and loading refuses the pair.
        write_bytes(directory / MODEL_FILE, weights)
        write_bytes(directory / META_FILE, meta_bytes)
    except OSError as error:
        raise CheckpointError(
            f"could not write model files in {directory}: {error}; check free disk space and permissions"
        ) from error
    return {MODEL_FILE: weights_sha256, META_FILE: hashlib.sha256(meta_bytes).hexdigest()}


def load_model_files(directory: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a model saved by :func:`save_model`: ``(state_dict on CPU, meta as given to save_model)``."""
    directory = Path(directory)
    meta_path, weights_path = directory / META_FILE, directory / MODEL_FILE
    try:
        meta_bytes = meta_path.read_bytes()
        weights = weights_path.read_bytes()
    except FileNotFoundError as error:
        raise CheckpointError(
            f"model directory {directory} has no {Path(error.filename).name}; it is incomplete: "
            "use another model version or retrain this step"
        ) from None
    except OSError as error:
        raise CheckpointError(
            f"cannot read model files in {directory}: {error}; check permissions"
        ) from error
    try:
        document = json.loads(meta_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"{meta_path} is not valid JSON ({error}); the model is damaged: use another model version"
        ) from error
    if not isinstance(document, dict) or document.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{meta_path} is not a ciss model description; use a directory written by ciss")
    if document.get("format_version") != MODEL_FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path} has format version {document.get('format_version')!r}, this ciss reads "
            f"{MODEL_FORMAT_VERSION}; use the ciss version that wrote it"
        )
    if hashlib.sha256(weights).hexdigest() != document.get("weights_sha256"):
        raise CheckpointError(
            f"{weights_path} does not match the sha256 recorded in {meta_path}; the model is damaged or "
            "half-written: use another model version"
        )
    try:
        # Loaded from the bytes just hashed, so the weights checked are the weights returned.
        state_dict = safetensors.torch.load(weights)
    except Exception as error:  # safetensors raises its own error types for damaged headers
        raise CheckpointError(f"{weights_path} is corrupt ({error}); use another model version") from error
    meta = {key: value for key, value in document.items() if key not in _RESERVED_META_KEYS}
    return state_dict, meta
