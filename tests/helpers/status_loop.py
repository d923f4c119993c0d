"""`ciss status --json` in a tight loop, for the reliability tests: ``python status_loop.py WS SECONDS HZ``.

Runs the real command (the ``ciss`` entry point, in this process, so that 20 calls a second cost no
interpreter start-ups) and prints one JSON line: reads, failures and their messages. With
``--as-nobody WARM_WS`` it first runs the command once on the workspace ``WARM_WS``, quick path and full
command (so that every module is imported while the interpreter's files are still readable), then drops
to the user ``nobody``, who cannot write ``WS``.
"""

from __future__ import annotations

import json
import os
import pwd
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO

from ciss_daemon.entry import main as ciss


def run(args: list[str]) -> tuple[int, str]:
    """``ciss *args`` in this process: its exit code and what it printed (stdout, then stderr)."""
    out, err = StringIO(), StringIO()
    code = 0
    try:
        with redirect_stdout(out), redirect_stderr(err):
            ciss(args)
    except SystemExit as exit_:  # the full command (Typer) always exits
        code = exit_.code if isinstance(exit_.code, int) else 1
    except Exception as exc:  # noqa: BLE001  (a failure to count, with its message)
        code, err = 1, StringIO(repr(exc))
    return code, out.getvalue() + err.getvalue()


def main(argv: list[str]) -> None:
    workspace, seconds, hz = argv[0], float(argv[1]), float(argv[2])
    if "--as-nobody" in argv:
        warm = argv[argv.index("--as-nobody") + 1]
        from ciss_daemon.cli import app  # the full command answers what the quick path hands it

        for args in (["status", "--json"], ["status"]):
            code, output = run([*args, "--workspace", warm])
            assert code == 0, output
            with redirect_stdout(StringIO()):
                app([*args, "--workspace", warm], standalone_mode=False)
        nobody = pwd.getpwnam("nobody")
        os.setgroups([])
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)  # drops every capability: from here on, nobody's permissions
        assert not os.access(workspace, os.W_OK)
    reads, failures, locked, messages, alive = 0, 0, 0, [], 0
    deadline = time.monotonic() + seconds
    next_at = time.monotonic()
    while time.monotonic() < deadline:
        code, output = run(["status", "--json", "--workspace", workspace])
        reads += 1
        try:
            data = json.loads(output) if code == 0 else None
        except ValueError:
            data = None
        if data is None:
            failures += 1
            message = output.strip()[-300:]
            locked += "database is locked" in message
            if len(messages) < 5:
                messages.append(message)
        elif data["daemon"]["alive"]:
            alive += 1
        next_at += 1.0 / hz
        time.sleep(max(0.0, next_at - time.monotonic()))
    print(
        json.dumps(
            {"reads": reads, "failures": failures, "locked": locked, "alive": alive, "messages": messages}
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
