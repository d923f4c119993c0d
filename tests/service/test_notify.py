"""[notify] webhooks against local HTTP servers: one that answers, one that is down, one that is slow."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from batchmaker import make_batch
from daemon_helpers import FakeClock, in_process_daemon, new_workspace, settings_text, wait_for
from web_helpers import Hook

from ciss_daemon.batch.inbox import SUBMITTED_MARKER
from ciss_daemon.exceptions import SettingsError
from ciss_daemon.service.notify import Notifier, deliver, message
from ciss_daemon.settings import NotifySettings, parse_settings


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    yield h
    h.close()


def free_port() -> int:
    """A port nothing listens on: the webhook that is down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


EVENT = {
    "id": 7,
    "event": "held",
    "level": "warning",
    "step": 3,
    "at": "2026-11-01T12:00:00+00:00",
    "message": "step 3: v0004 held for the operator: new-class mIoU 0.050 is below the floor 0.100",
}


def test_the_message_is_slack_compatible_with_the_fields_under_ciss() -> None:
    body = message(EVENT, workspace="/srv/ciss")
    assert body["text"] == (
        ":raised_hand: ciss step held for the operator: step 3: v0004 held for the operator: "
        "new-class mIoU 0.050 is below the floor 0.100 (/srv/ciss)"
    )
    assert body["ciss"] == {**{k: v for k, v in EVENT.items() if k != "id"}, "workspace": "/srv/ciss"}


def test_deliver_posts_json_to_a_local_server(hook: Hook) -> None:
    assert deliver(hook.url, {"text": "hi"}, timeout=5, retries=0, retry_seconds=0)
    assert hook.bodies == [{"json": {"text": "hi"}, "type": "application/json"}]


def test_a_server_that_is_down_is_retried_with_doubling_pauses_then_given_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pauses: list[float] = []
    url = f"http://127.0.0.1:{free_port()}/services/secret-path"
    ok = deliver(url, {"text": "x"}, timeout=2, retries=3, retry_seconds=0.5, sleep=pauses.append)
    assert not ok and pauses == [0.5, 1.0, 2.0]
    assert "failed after 4 tries" in caplog.text and "secret-path" not in caplog.text


def test_an_error_answer_counts_as_a_failure() -> None:
    failing = Hook(status=500)
    try:
        assert not deliver(
            failing.url, {"text": "x"}, timeout=5, retries=1, retry_seconds=0, sleep=lambda _: None
        )
        assert len(failing.bodies) == 2
    finally:
        failing.close()


def test_a_slow_server_times_out_and_never_blocks_send(hook: Hook) -> None:
    hook.gate.clear()  # the server takes the request and does not answer
    settings = NotifySettings(webhooks=[hook.url], timeout_seconds=0.5, retries=1, retry_seconds=0)
    notifier = Notifier(settings, workspace="/ws")
    for _ in range(3):
        notifier.send(EVENT)  # returns at once although nothing has been answered
    assert notifier.delivered == 0  # the server has answered nothing yet
    wait_for(lambda: notifier.failed == 3, "three events to time out", timeout=30)
    assert len(hook.bodies) == 6  # each tried twice
    hook.gate.set()
    notifier.send(EVENT)
    wait_for(lambda: notifier.delivered == 1, "the server to answer again", timeout=30)
    notifier.close()
    assert not notifier.thread.is_alive()


def test_a_full_queue_drops_instead_of_waiting(hook: Hook, monkeypatch: pytest.MonkeyPatch) -> None:
    import ciss_daemon.service.notify as notify

    hook.gate.clear()
    monkeypatch.setattr(notify, "QUEUE_SIZE", 2)
    notifier = Notifier(NotifySettings(webhooks=[hook.url], timeout_seconds=5, retries=0), workspace="/ws")
    for _ in range(10):
        notifier.send(EVENT)
    assert notifier.queue.qsize() <= 2
    hook.gate.set()
    notifier.close(timeout=10)


def test_notify_settings_are_checked() -> None:
    with pytest.raises(SettingsError) as bad_url:
        parse_settings('[notify]\nwebhooks = ["ftp://x"]')
    assert str(bad_url.value) == "ciss.toml: notify.webhooks: 'ftp://x' is not an http:// or https:// URL"
    with pytest.raises(SettingsError) as bad_event:
        parse_settings('[notify]\nevents = ["started"]')
    assert str(bad_event.value) == (
        "ciss.toml: notify.events: 'started' is not one of promoted, held, failed, rejected"
    )


def test_the_daemon_posts_a_rejection_once(hook: Hook, tmp_path: Path) -> None:
    text = settings_text(notify__webhooks=[hook.url], notify__retries=0)
    ws = new_workspace(tmp_path / "ws", text)
    clock = FakeClock()
    daemon = in_process_daemon(ws, clock)
    try:
        bad = make_batch(tmp_path, "broken")
        (bad / "batch.toml").write_text("[classes]\n")  # declares no class
        (ws.inbox / "broken").mkdir()
        for item in bad.iterdir():
            item.rename(ws.inbox / "broken" / item.name)
        (ws.inbox / "broken" / SUBMITTED_MARKER).touch()
        daemon.tick(clock.advance(1))
        wait_for(lambda: len(hook.bodies) == 1, "the rejection to be posted", timeout=30)
    finally:
        daemon.shutdown()
    sent = hook.bodies[0]["json"]
    assert sent["ciss"]["event"] == "rejected" and sent["ciss"]["workspace"] == str(ws.root)
    assert sent["text"].startswith(":warning: ciss batch rejected: batch 'broken' rejected: ")
    # A restarted daemon does not send what was already in the catalog.
    daemon = in_process_daemon(ws, clock)
    try:
        daemon.tick(clock.advance(1))
    finally:
        daemon.shutdown()
    assert len(hook.bodies) == 1


def test_parse_settings_accepts_webhooks() -> None:
    settings = parse_settings('[notify]\nwebhooks = ["https://hooks.example/x"]\nretries = 0')
    assert settings.notify.webhooks == ["https://hooks.example/x"] and settings.notify.retries == 0
