"""The dashboard in a real browser (Debian's Chromium through Playwright): names as text, charts, actions."""

from __future__ import annotations

from pathlib import Path

import pytest
from batchmaker import make_batch
from browser import charts_drawn, chromium, ciss_web, free_port, get_json, needs_chromium, wait_http
from daemon_helpers import DaemonProcess, new_workspace, settings_text, step_states, wait_for
from web_helpers import EVIL_BATCH, EVIL_CLASS, EVIL_REJECTED, TOKEN, Hook, seed, workspace

from ciss_daemon.batch.inbox import submit_folder
from ciss_daemon.web import samples
from ciss_daemon.workspace import Workspace

pytestmark = needs_chromium


def test_names_stay_text_charts_render_and_actions_need_the_token(tmp_path: Path) -> None:
    ws = workspace(tmp_path / "ws", token=TOKEN)
    seed(ws)
    with ciss_web(ws, free_port()) as url, chromium() as page:
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(url)
        page.wait_for_function("() => document.body.dataset.charts === '4'")
        # HTML in a batch, class or rejected folder name is shown as it is, and never runs.
        assert page.evaluate("window.pwned") is None
        row = page.locator('tr.step[data-step="1"]')
        assert row.locator("td.name").inner_text() == EVIL_BATCH
        assert row.locator("span.class").inner_text() == EVIL_CLASS
        assert EVIL_REJECTED in page.locator("#rejections").inner_text()
        drawn = charts_drawn(page)
        assert drawn["chart-miou"] and drawn["chart-heatmap"] and drawn["chart-loss"], drawn
        # Without the token the daemon's catalog is not touched.
        page.on("dialog", lambda dialog: dialog.accept())
        page.click('button[data-action="promote"][data-target="1"]')
        page.wait_for_function("() => document.getElementById('action-result').className === 'refused'")
        assert page.inner_text("#action-result") == (
            "wrong or missing operator token; enter the [web] token of ciss.toml"
        )
        assert get_json(f"{url}/api/status")["current"]["version"] == "v0001"
        # With it, the promotion goes through and the page shows the new model without a reload.
        page.evaluate("window.notReloaded = true")
        page.fill("#token", TOKEN)
        page.click('button[data-action="promote"][data-target="1"]')
        page.wait_for_function("() => document.getElementById('current-version').textContent === 'v0002'")
        assert page.inner_text("#action-result") == "v0002 (step 1) is now the current model"
        assert page.evaluate("window.notReloaded") is True
        assert page.locator('tr.step[data-step="1"] .state').inner_text() == "promoted"
        assert errors == []


def test_a_read_only_dashboard_has_no_actions(tmp_path: Path) -> None:
    ws = workspace(tmp_path / "ws")
    seed(ws)
    with ciss_web(ws, free_port()) as url, chromium() as page:
        page.goto(url)
        page.wait_for_function("() => document.body.dataset.charts === '4'")
        assert page.locator("button.action").count() == 0 and page.locator("#token").count() == 0
        answer = page.evaluate(
            """async () => {
                const r = await fetch('/api/actions/promote', {method: 'POST',
                    headers: {'Content-Type': 'application/json', 'Authorization': 'Bearer anything'},
                    body: JSON.stringify({target: '1'})});
                return [r.status, (await r.json()).message];
            }"""
        )
        assert answer == [403, "read-only dashboard: set [web] token in ciss.toml to allow operator actions"]


def daemon_workspace(tmp_path: Path, **settings: object) -> tuple[Workspace, str]:
    """A tiny-settings workspace whose daemon serves the dashboard ([web] enabled) with TOKEN; its URL."""
    port = free_port()
    text = settings_text(web__enabled=True, web__port=port, web__token=TOKEN, **settings)
    return new_workspace(tmp_path / "ws", text), f"http://127.0.0.1:{port}"


@pytest.mark.slow
def test_a_real_daemon_training_shows_progress_advancing_on_screen(tmp_path: Path) -> None:
    """`ciss daemon` with [web] enabled trains; the page follows the iterations without a reload."""
    # 160 iterations: long enough to be seen moving on a fast machine; the test stops it once it has.
    ws, url = daemon_workspace(tmp_path, train__epochs_base=40)
    batch = make_batch(tmp_path, "bikes", classes={1: "bicycle"}, n_train=16, n_val=2, size=(32, 32))
    daemon = DaemonProcess(ws)
    try:
        wait_http(f"{url}/api/live")
        with chromium() as page:
            page.goto(url)
            page.evaluate("window.notReloaded = true")
            submit_folder(batch, ws.inbox)
            page.wait_for_function(
                "() => Number(document.getElementById('running-iteration').textContent) > 0", timeout=240_000
            )
            first = int(page.inner_text("#running-iteration"))
            page.wait_for_function(
                f"() => Number(document.getElementById('running-iteration').textContent) > {first}",
                timeout=240_000,
            )
            assert page.is_visible("#running-job") and page.inner_text("#running-batch") == "bikes"
            assert int(page.inner_text("#running-total")) >= 40  # 40 epochs
            assert page.evaluate("window.notReloaded") is True
            assert charts_drawn(page)["chart-live-loss"]  # the running job's loss, two points or more
    finally:
        assert daemon.stop() == 0


@pytest.mark.slow
def test_a_held_step_is_promoted_from_the_page_through_the_daemon(tmp_path: Path) -> None:
    """The daemon holds a trained step; the page promotes it with the token (through the daemon's
    requests, as `ciss promote`), shows the new model's charts and samples; the webhook hears both."""
    hook = Hook()
    ws, url = daemon_workspace(
        tmp_path, gate__new_miou_floor=1.0, train__epochs_base=1, notify__webhooks=[hook.url]
    )
    batch = make_batch(tmp_path, "bikes", classes={1: "bicycle"}, n_train=8, n_val=2, size=(32, 32))
    daemon = DaemonProcess(ws)
    try:
        wait_http(f"{url}/api/live")
        submit_folder(batch, ws.inbox)
        with chromium() as page:
            page.goto(url)
            page.wait_for_selector('button[data-action="promote"][data-target="0"]', timeout=300_000)
            assert step_states(ws) == ["held"] and page.is_hidden("#running-job")
            page.fill("#token", TOKEN)
            page.click('button[data-action="promote"][data-target="0"]')
            page.wait_for_function(
                "() => document.getElementById('action-result').textContent.includes('is now the current')",
                timeout=60_000,
            )
            assert page.inner_text("#action-result") == "v0001 (step 0) is now the current model"
            page.wait_for_function("() => document.body.dataset.charts === '4'")
            drawn = charts_drawn(page)
            assert drawn["chart-miou"] and drawn["chart-loss"] and drawn["chart-heatmap"], drawn
            # Sample predictions of the new current model, drawn by a child process, then shown.
            wait_for(lambda: (samples.folder(ws) / "v0001").is_dir(), "the sample predictions", timeout=300)
            page.reload()
            page.wait_for_function(
                "() => [...document.querySelectorAll('#samples img')].filter((i) => i.naturalWidth).length"
                " >= 3"
            )
        assert step_states(ws) == ["promoted"]
        wait_for(lambda: len(hook.bodies) == 2, "the held and promoted notifications", timeout=30)
    finally:
        assert daemon.stop() == 0
        hook.close()
    assert [b["json"]["ciss"]["event"] for b in hook.bodies] == ["held", "promoted"]
