"""The examples run for real: the support script, the Flask and FastAPI apps, and the
chatbot demo (as a subprocess, checked against its database afterwards)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import casern
from casern import _demo
from casern._cli import cli

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _examples_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO))


def run_python(
    *args: str, cwd: Path = REPO, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


# -- support: the original casern's support-inquiry flow --------------------------------


def test_support_script_escalates_the_unanswered_inquiry_and_emails_support() -> None:
    result = run_python("-m", "examples.support")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "[email] to support@example.org: Inquiry ticket-1 escalated" in out
    assert "ticket-1: escalated" in out
    assert "ticket-2: answered" in out
    assert "1 email(s) sent" in out
    assert "Traceback" not in result.stderr


def test_support_app_works_from_the_command_line(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/support.db"
    base = ["--app", "examples.support:make_app", "--store", store]
    now = time.time() - 3600  # an hour ago: long past the 600 s timeout
    runner = CliRunner()
    sent = runner.invoke(
        cli, [*base, "send", "initialInquiry", "t-1", json.dumps({"text": "hi", "now": now})]
    )
    assert sent.exit_code == 0, sent.output
    assert json.loads(sent.stdout)["status"] == "waiting"
    fired = runner.invoke(cli, [*base, "worker", "--once"])
    assert fired.exit_code == 0, fired.output
    shown = runner.invoke(cli, [*base, "show", "t-1"])
    assert json.loads(shown.stdout)["status"] == "escalated"
    assert "[email] to support@example.org: Inquiry t-1 escalated" in fired.stdout


# -- the web examples -------------------------------------------------------------------


@pytest.fixture
def conversations_app(store_url: str) -> Iterator[casern.Casern]:
    from examples import conversations

    app = conversations.make_app(store_url)
    yield app
    app.close()


def test_flask_app_serves_conversations(conversations_app: casern.Casern) -> None:
    pytest.importorskip("flask")
    from examples.flask_app import create_app

    client = create_app(conversations_app).test_client()
    ok = client.post("/conversations/c-1/messages", json={"text": "hello"})
    assert ok.status_code == 200, ok.get_data(as_text=True)
    assert ok.get_json()["messages"] == ["hello"]
    again = client.post("/conversations/c-1/messages", json={"text": "anyone?"})
    assert again.get_json()["count"] == 2

    got = client.get("/conversations/c-1")
    assert got.status_code == 200
    assert got.get_json()["messages"] == ["hello", "anyone?"]
    assert client.get("/conversations/c-2").status_code == 404

    invalid = client.post("/conversations/c-1/messages", json={"text": 42})
    assert invalid.status_code == 400
    assert "text" in invalid.get_json()["error"]
    not_json = client.post("/conversations/c-1/messages", data="hi", content_type="text/plain")
    assert not_json.status_code == 400
    bad_id = client.post("/conversations/_design/messages", json={"text": "x"})
    assert bad_id.status_code == 400
    assert "_" in bad_id.get_json()["error"]
    assert conversations_app.get("c-1")["count"] == 2  # the refused ones wrote nothing
    # Ids with "/" (which casern keeps) are reachable, percent-encoded or not.
    slashed = client.post("/conversations/team%2Fa/messages", json={"text": "hi"})
    assert slashed.status_code == 200, slashed.get_data(as_text=True)
    assert client.get("/conversations/team/a").get_json()["messages"] == ["hi"]
    assert conversations_app.get("team/a")["count"] == 1


@pytest.mark.filterwarnings("ignore:Using `httpx`")
def test_fastapi_app_serves_conversations_and_runs_timers(store_url: str) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from examples import conversations
    from examples.fastapi_app import create_api

    made: list[casern.Casern] = []

    def factory() -> casern.Casern:
        made.append(conversations.make_app(store_url, idle=0.3, tick=0.1))
        return made[-1]

    with TestClient(create_api(factory)) as client:  # runs the lifespan: astart/astop
        ok = client.post("/conversations/c-1/messages", json={"text": "hello"})
        assert ok.status_code == 200, ok.text
        assert ok.json()["status"] == "open"
        assert client.get("/conversations/nope").status_code == 404
        invalid = client.post("/conversations/c-1/messages", json={"text": ""})
        assert invalid.status_code == 400
        assert "text" in invalid.json()["error"]
        assert client.post("/conversations/c-1/messages", content=b"[1]").status_code == 400
        assert client.post("/conversations/_x/messages", json={"text": "x"}).status_code == 400
        slashed = client.post("/conversations/team%2Fa/messages", json={"text": "hi"})
        assert slashed.status_code == 200, slashed.text  # ids with "/" are reachable
        assert client.get("/conversations/team/a").json()["count"] == 1

        deadline = time.monotonic() + 15
        state: dict[str, Any] = {}
        while time.monotonic() < deadline and state.get("status") != "idle":
            time.sleep(0.1)
            state = client.get("/conversations/c-1").json()
        assert state["status"] == "idle", "the idle timer never fired in the server process"
        assert state["count"] == 1
    assert len(made) == 1
    with pytest.raises(casern.CasernError, match="closed"):
        made[0].send("message", "c-1", {"text": "late", "now": time.time()})


# -- the chatbot demo -------------------------------------------------------------------


def summary(out: str) -> dict[str, str]:
    """The demo's summary rows: name -> value (as printed)."""
    rows = {}
    for line in out.splitlines():
        m = re.match(r"^  ([a-z ]+?)\s{2,}([\d,.]+(?: [a-z/]+)?)\s{3}", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def number(text: str) -> int:
    return int(text.split()[0].replace(",", ""))


def test_chatbot_demo_state_matches_what_was_sent(tmp_path: Path) -> None:
    db = tmp_path / "demo.db"
    n, seed = 120, 3
    result = run_python(
        "-m",
        "examples.chatbot",
        "--conversations",
        str(n),
        "--idle",
        "0.5",
        "--db",
        str(db),
        "--seed",
        str(seed),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "check: OK" in result.stdout
    rows = summary(result.stdout)
    assert number(rows["conversations"]) == n

    plan = _demo.scripts(n, seed)
    with _demo.make_app(f"sqlite:///{db}") as app:
        ids = app.ids(prefix="chat-")
        assert ids == sorted(s.id for s in plan)
        messages = commits = 0
        for script in plan:
            state = app.get(script.id)
            assert state is not None
            said = [*script.first, *script.after_nudge]
            assert state["messages"] == len(said)
            assert state["last_text"] == said[-1]
            assert state["status"] == ("escalated" if script.kind == "leaves" else "closed")
            messages += len(said)
            commits += len(app.history(script.id))
        helpdesk = app.get(_demo.HELPDESK)
        assert helpdesk is not None
        escalated = sorted(s.id for s in plan if s.kind == "leaves")
        assert sorted(helpdesk["waiting"]) == escalated
        commits += len(app.history(_demo.HELPDESK))
        assert app.failed() == []

    assert number(rows["user messages"]) == messages
    assert number(rows["commits"]) == commits
    timers = number(rows["timers fired"])
    nudges = sum(s.kind != "closes" for s in plan)
    assert timers >= nudges + len(escalated)
    assert number(rows["bot replies"]) == messages + timers
    assert number(rows["listener deliveries"]) == 3 * commits
    assert "msgs/s" in rows["throughput"]


def test_casern_demo_runs_from_any_directory(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "casern"
    result = subprocess.run(
        [str(script), "demo", "-n", "40", "--idle", "0.5"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "casern-demo.db").exists()
    assert str(tmp_path / "casern-demo.db") in result.stdout
    assert "check: OK" in result.stdout
    again = subprocess.run(  # the database is recreated, not added to
        [str(script), "demo", "-n", "40", "--idle", "0.5"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert summary(again.stdout)["commits"] == summary(result.stdout)["commits"]


def test_demo_refuses_to_overwrite_a_file_that_is_not_a_casern_database(tmp_path: Path) -> None:
    precious = tmp_path / "notes.db"
    precious.write_text("my notes")
    result = CliRunner().invoke(cli, ["demo", "-n", "5", "--db", str(precious)])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"casern: error: {precious} exists and is not a casern database; choose another --db"
    ]
    assert precious.read_text() == "my notes"
