"""Fault injection for the reliability tests, loaded into daemon and worker processes via PYTHONPATH.

Python imports ``sitecustomize`` at start-up when it is on the path; tests put this folder there (see
``daemon_helpers.DaemonProcess``) together with ``CISS_FAULTS``, a JSON list of rules. Each rule wraps one
file operation of the ``os`` module; the product code calls those through the module, so the wrappers
see every rename, replace, fsync and symlink it makes (SQLite's own I/O is C code and is not touched):

- ``op``: ``replace`` | ``rename`` | ``fsync`` | ``symlink``;
- ``match``: a regular expression searched in ``"<source> -> <destination>"`` (for fsync: the file's path);
- ``action``: ``pause`` writes ``<marker>/<pid>.json`` (the pid, the op, the paths) then sleeps
  ``seconds`` (a test kills the process meanwhile, at a moment it chose), or ``enospc`` raises
  ``OSError(ENOSPC)`` as a full disk would;
- ``when``: ``before`` (default) or ``after`` the real operation (pause only);
- ``skip``: let this many matching calls through first; ``times``: act on at most this many calls;
- ``process``: ``worker`` | ``daemon`` | ``any`` (default): which process the rule applies to.

Nothing happens unless ``CISS_FAULTS`` is set, so this file is inert for every other process.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys
import time
from typing import Any

_RULES: list[dict[str, Any]] = []


def _process_kind() -> str:
    # Decided at call time: sys.argv is not set yet while site imports this module.
    argv = " ".join(sys.argv)
    worker = "ciss_daemon.service.worker" in argv or "ciss_daemon/service/worker" in argv
    return "worker" if worker else "daemon"


def _describe(op: str, args: tuple[Any, ...]) -> str:
    if op == "fsync":
        try:
            return os.readlink(f"/proc/self/fd/{args[0]}")
        except OSError:
            return ""
    names = [os.fsdecode(a) if isinstance(a, (str, bytes, os.PathLike)) else str(a) for a in args[:2]]
    return " -> ".join(names)


def _matching(op: str, args: tuple[Any, ...]) -> list[dict[str, Any]]:
    found = []
    described = None
    for rule in _RULES:
        if rule["op"] != op:
            continue
        if rule.get("process", "any") not in ("any", _process_kind()):
            continue
        if described is None:
            described = _describe(op, args)
        if not re.search(rule["match"], described):
            continue
        rule["seen"] = rule.get("seen", 0) + 1
        if rule["seen"] <= rule.get("skip", 0):
            continue
        if rule.get("times") is not None and rule.get("done", 0) >= rule["times"]:
            continue
        rule["done"] = rule.get("done", 0) + 1
        found.append({**rule, "described": described})
    return found


def _pause(rule: dict[str, Any], op: str) -> None:
    marker = rule["marker"]
    os.makedirs(marker, exist_ok=True)
    path = os.path.join(marker, f"{os.getpid()}.json")
    data = {"pid": os.getpid(), "op": op, "when": rule.get("when", "before"), "what": rule["described"]}
    with open(path + ".part", "w", encoding="utf-8") as handle:
        json.dump(data, handle)
    _ORIGINAL["rename"](path + ".part", path)
    time.sleep(float(rule.get("seconds", 120)))


def _wrap(op: str) -> None:
    original = getattr(os, op)
    _ORIGINAL[op] = original

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        rules = _matching(op, args)
        for rule in rules:
            if rule["action"] == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), rule["described"])
            if rule["action"] == "pause" and rule.get("when", "before") == "before":
                _pause(rule, op)
        result = original(*args, **kwargs)
        for rule in rules:
            if rule["action"] == "pause" and rule.get("when") == "after":
                _pause(rule, op)
        return result

    wrapper.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(os, op, wrapper)


_ORIGINAL: dict[str, Any] = {}


def install(rules: list[dict[str, Any]]) -> None:
    _RULES[:] = rules
    for op in sorted({rule["op"] for rule in rules} | {"rename"}):
        _wrap(op)


if os.environ.get("CISS_FAULTS"):
    install(json.loads(os.environ["CISS_FAULTS"]))
