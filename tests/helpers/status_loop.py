"""`ciss status --json` in a tight loop, for the reliability tests: ``python status_loop.py WS SECONDS HZ``.

Runs the real command (Typer's test runner, in this process, so that 20 calls a second cost no interpreter
start-ups) and prints one JSON line: reads, failures and their messages. With ``--as-nobody WARM_WS`` it
first runs the command once on the workspace ``WARM_WS`` (so that every module is imported while the
interpreter's files are still readable), then drops to the user ``nobody``, who cannot write ``WS``.
"""

from __future__ import annotations

import json
import os
import pwd
import sys
import time

from typer.testing import CliRunner

from ciss_daemon.cli import app


def main(argv: list[str]) -> None:
    workspace, seconds, hz = argv[0], float(argv[1]), float(argv[2])
    runner = CliRunner()
    if "--as-nobody" in argv:
        warm = argv[argv.index("--as-nobody") + 1]
        for args in (["status", "--json"], ["status"]):
            warmed = runner.invoke(app, [*args, "--workspace", warm])
            assert warmed.exit_code == 0, warmed.output
        nobody = pwd.getpwnam("nobody")
        os.setgroups([])
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)  # drops every capability: from here on, nobody's permissions
        assert not os.access(workspace, os.W_OK)
    reads, failures, locked, messages, alive = 0, 0, 0, [], 0
    deadline = time.monotonic() + seconds
    next_at = time.monotonic()
    while time.monotonic() < deadline:
        result = runner.invoke(app, ["status", "--json", "--workspace", workspace])
        reads += 1
        try:
            data = json.loads(result.output) if result.exit_code == 0 else None
        except ValueError:
            data = None
        if data is None:
            failures += 1
            message = (result.output or repr(result.exception)).strip()[-300:]
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
