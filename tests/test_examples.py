"""The examples run for real: the support script, the Flask and FastAPI apps, and the
chatbot demo (as a subprocess, checked against its database afterwards)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

import casern
from _couch import free_port
from _process import output, running
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


# -- the Django example: real servers, real HTTP ---------------------------------------


def stop(proc: subprocess.Popen[str]) -> str:
    """SIGINT, as Ctrl-C would; the process must exit cleanly. Returns its stderr."""
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0, output(proc)
    err = output(proc)
    assert "Traceback" not in err, err
    return err


def check_conversations_api(base: str, prefix: str) -> None:
    """The Django views, sync (`send`) or async (`asend`) by `prefix`, over real HTTP."""
    post = f"{base}{prefix}/conversations"
    ok = httpx.post(f"{post}/c-1/messages", json={"text": "hello"})
    assert ok.status_code == 200, ok.text
    assert ok.json()["messages"] == ["hello"] and ok.json()["status"] == "open"
    slashed = httpx.post(f"{post}/team%2Fa/messages", json={"text": "hi"})
    assert slashed.status_code == 200, slashed.text  # ids with "/" are reachable
    again = httpx.post(f"{post}/team/a/messages", json={"text": "again"})
    assert again.json()["count"] == 2
    assert httpx.get(f"{base}/conversations/team/a").json()["messages"] == ["hi", "again"]
    assert httpx.get(f"{base}/conversations/nope").status_code == 404
    invalid = httpx.post(f"{post}/c-1/messages", json={"text": ""})
    assert invalid.status_code == 400 and "text" in invalid.json()["error"]
    not_json = httpx.post(f"{post}/c-1/messages", content=b"hi")
    assert not_json.status_code == 400 and "JSON object" in not_json.json()["error"]
    bad_id = httpx.post(f"{post}/_design/messages", json={"text": "x"})
    assert bad_id.status_code == 400 and "_" in bad_id.json()["error"]
    assert httpx.get(f"{post}/c-1/messages").status_code == 405
    assert httpx.get(f"{base}/conversations/c-1").json()["count"] == 1  # refused: nothing
    machines = httpx.get(f"{base}/inspector/api/machines").json()  # the mounted inspector
    assert machines == {"ids": ["c-1", "team/a"]}
    assert httpx.get(f"{base}/inspector/").status_code == 200


def django_env(store_url: str, idle: float = 300.0) -> dict[str, str]:
    return {"CONVERSATIONS_STORE": store_url, "CONVERSATIONS_IDLE": str(idle)}


def test_django_app_under_runserver_with_a_casern_worker_beside_it(store_url: str) -> None:
    pytest.importorskip("django")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = django_env(store_url, idle=0.5)
    manage = [sys.executable, "examples/django_app/manage.py"]
    casern_script = str(Path(sys.executable).parent / "casern")
    worker = [casern_script, "--app", "examples.django_app.machines:casern_app", "worker"]
    with (
        running(
            [*manage, "runserver", "--noreload", f"127.0.0.1:{port}"], cwd=REPO, env=env, probe=base
        ) as web,
        running(worker, cwd=REPO, env=env) as timers,
    ):
        check_conversations_api(base, "")
        deadline = time.monotonic() + 30
        state: dict[str, Any] = {}
        while time.monotonic() < deadline and state.get("status") != "idle":
            time.sleep(0.2)
            state = httpx.get(f"{base}/conversations/c-1").json()
        assert state["status"] == "idle", "the worker beside runserver never fired the timer"
        stop(web)
        assert "nudging c-1: are you still there?" in stop(timers)  # the listener's own log
    from examples import conversations

    with conversations.make_app(store_url) as app:
        assert app.get("team/a")["count"] == 2
        assert app.failed() == []


def test_django_asgi_app_under_uvicorn_serves_the_async_view(store_url: str) -> None:
    pytest.importorskip("django")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    uvicorn = [sys.executable, "-m", "uvicorn", "examples.django_app.asgi:application"]
    with running(
        [*uvicorn, "--port", str(port)], cwd=REPO, env=django_env(store_url), probe=base
    ) as web:
        check_conversations_api(base, "/async")
        stop(web)
    from examples import conversations

    with conversations.make_app(store_url) as app:
        assert app.get("c-1")["messages"] == ["hello"]


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
        assert helpdesk["count"] == len(escalated)  # each escalation counted once
        assert set(helpdesk["latest"]) <= set(escalated)
        assert len(helpdesk["latest"]) == min(10, len(escalated))
        assert sorted(app.find({"status": "escalated"}, limit=10_000)) == escalated
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
