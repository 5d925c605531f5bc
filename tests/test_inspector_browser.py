"""The inspector in a real browser: Debian's headless Chromium driven by Playwright.

It opens the machines page, filters by prefix, opens a machine, reads its state and
the timeline's diff, presses Retry on a failed delivery, and checks that a state full
of markup is shown as text (no script runs). Screenshots of the main pages go to
$CASERN_SCREENSHOTS (default: the test's tmp_path) for a person to look at.

Needs /usr/bin/chromium (`apt-get install -y chromium`); Playwright's own browser
downloads are never used. In CI a missing Chromium fails the test; elsewhere it skips
and says why.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from playwright.sync_api import expect, sync_playwright

import casern
import casern.inspector
from _couch import free_port

LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    message = (
        "no Chromium for the inspector's browser test: install Debian's package with"
        " `apt-get install -y chromium` (Playwright's own download is not used)"
    )
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def browser_page(tmp_path: Path) -> Iterator[Any]:
    executable = chromium_path()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            yield page
        finally:
            browser.close()


@pytest.fixture
def serve() -> Iterator[Callable[[casern.Casern], str]]:
    """Serve the inspector (ASGI, uvicorn) in a thread on a free port."""
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(app: casern.Casern) -> str:
        port = free_port()
        config = uvicorn.Config(
            casern.inspector.asgi(app), host="127.0.0.1", port=port, log_level="warning"
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start in 30 s"
            time.sleep(0.05)
        servers.append((server, thread))
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("CASERN_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def conversation(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
    messages = [*state.get("messages", []), data["text"]]
    return {**state, "status": data.get("status", "open"), "messages": messages}


def wake(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
    return {**state, "status": "escalated"}


class Mailer:
    def __init__(self) -> None:
        self.up = False
        self.sent: list[tuple[str, int]] = []

    def __call__(self, change: casern.Change) -> None:
        if change.id.startswith("conv-0007") and not self.up:
            raise ConnectionError("SMTP server smtp.example.org refused the connection")
        self.sent.append((change.id, change.seq))


def test_a_person_filters_opens_a_machine_reads_the_diff_and_retries(
    make_app: Callable[..., casern.Casern],
    serve: Callable[[casern.Casern], str],
    browser_page: Any,
    tmp_path: Path,
) -> None:
    mailer = Mailer()
    app = make_app(
        {"message": conversation, "wake": wake},
        {"email": mailer},
        timers={"wake": lambda prefs, s: 4_000_000_000.0 if s.get("status") == "open" else None},
        indexes=("status",),
    )
    for i in range(30):
        app.send("message", f"conv-{i:04d}", {"text": "Hello, where is my order?"})
    for i in range(5):
        app.send("message", f"order-{i}", {"text": "paid"})
    app.send("message", "conv-0007", {"text": "Still waiting…", "status": "waiting"})
    app.send("message", "conv-0007", {"text": "Anyone there?", "status": "open"})
    app.send("message", "conv-0012", {"text": "Thanks, bye", "status": "closed"})
    evil = "<script>window.__pwned = 1</script><img src=x onerror='window.__pwned = 2'>"
    app.send("message", "order-<b>evil</b>", {"text": evil})
    app.drain()
    base = serve(app)
    page = browser_page
    folder = shots(tmp_path)
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))

    page.goto(base + "/")
    assert page.locator("#ids li").count() == 36
    page.fill("input[name=prefix]", "conv-000")
    with page.expect_navigation():
        page.click("form.filters button")
    assert "prefix=conv-000" in page.url
    links = page.locator("#ids a")
    assert links.count() == 10
    assert links.all_inner_texts() == [f"conv-{i:04d}" for i in range(10)]
    page.screenshot(path=str(folder / "inspector-machines.png"), full_page=True)

    page.fill("input[name=prefix]", "")
    page.fill("input[name=selector]", '{"status": "closed"}')
    with page.expect_navigation():
        page.press("input[name=selector]", "Enter")
    assert page.locator("#ids a").all_inner_texts() == ["conv-0012"]
    page.goto(base + "/?prefix=conv-000")

    with page.expect_navigation():
        page.get_by_role("link", name="conv-0007", exact=True).click()
    assert page.inner_text("h1") == "conv-0007"
    assert page.inner_text("#seq") == "3"
    assert '"status": "open"' in page.inner_text("#state")
    events = page.locator("#timeline .event")
    assert events.count() == 3
    newest = events.nth(0).inner_text()
    assert "message" in newest and "#3" in newest
    assert "status" in newest and '"waiting"' in newest and '"open"' in newest
    assert "messages[2]" in newest and "Anyone there?" in newest
    assert page.locator("#timeline .event").nth(0).locator(".diff .change").count() == 1
    assert page.locator("#failed tr").count() == 4  # a header and three failed changes
    page.screenshot(path=str(folder / "inspector-machine.png"), full_page=True)

    mailer.up = True
    with page.expect_navigation():
        page.click("#retry")
    assert "Re-queued 3 failed deliveries" in page.inner_text(".flash")
    assert app.drain(30)
    assert sorted(s for s in mailer.sent if s[0] == "conv-0007") == [
        ("conv-0007", 1),
        ("conv-0007", 2),
        ("conv-0007", 3),
    ]
    page.reload()
    assert "None failed." in page.inner_text("body")

    page.goto(base + "/")
    with page.expect_navigation():
        page.get_by_role("link", name="order-<b>evil</b>", exact=True).click()
    assert "<script>window.__pwned = 1</script>" in page.inner_text("#state")
    assert page.evaluate("window.__pwned") is None and dialogs == []
    assert page.locator("#main script, #main img").count() == 0
    page.screenshot(path=str(folder / "inspector-escaped.png"), full_page=True)

    page.goto(base + "/failed")
    assert "No failed deliveries." in page.inner_text("main")


def test_live_refresh_shows_a_new_change_without_a_reload(
    make_app: Callable[..., casern.Casern],
    serve: Callable[[casern.Casern], str],
    browser_page: Any,
) -> None:
    app = make_app({"message": conversation})
    app.send("message", "live-1", {"text": "first"})
    page = browser_page
    page.goto(serve(app) + "/machines/live-1")
    page.evaluate("window.__before_refresh = 1")  # gone if the page were reloaded
    page.check("#live")
    app.send("message", "live-1", {"text": "second"})
    expect(page.locator("#seq")).to_have_text("2", timeout=20_000)  # no reload: live
    assert page.locator("#timeline .event").count() == 2
    assert page.is_checked("#live")  # the toggle lives outside the refreshed part
    assert page.evaluate("window.__before_refresh") == 1


def test_failed_page_retries_every_failure(
    make_app: Callable[..., casern.Casern],
    serve: Callable[[casern.Casern], str],
    browser_page: Any,
    tmp_path: Path,
) -> None:
    mailer = Mailer()
    app = make_app({"message": conversation}, {"email": mailer})
    for i in range(3):
        app.send("message", f"conv-0007-{i}", {"text": "help"})
    app.drain()
    page = browser_page
    page.goto(serve(app) + "/failed")
    assert page.locator("#failed tr").count() == 4
    assert "SMTP server smtp.example.org refused" in page.inner_text("#failed")
    page.screenshot(path=str(folder_for(tmp_path) / "inspector-failed.png"), full_page=True)
    mailer.up = True
    with page.expect_navigation():
        page.click("#retry-all")
    assert app.drain(30)
    page.reload()
    assert "No failed deliveries." in page.inner_text("main")


def folder_for(tmp_path: Path) -> Path:
    return shots(tmp_path)
