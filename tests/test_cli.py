"""The `casern` command line, run for real: in-process with click's CliRunner, and as the
installed console script in subprocesses (send, show, history, ls, failed, retry,
migrate, worker with SIGTERM, errors).

The app under test is a module written into tmp_path; its factory accepts `store=`,
and the tests pass the store with `--store`, so every test runs on every store.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

import casern
from _process import SIGINT_IGNORED
from casern._cli import cli, load_app

TEST_APP = '''
import logging
import os
import pathlib
import time

import casern

HERE = pathlib.Path(__file__).parent
STORE = {store!r}


def inc(preferences, state, data):
    state["n"] = state.get("n", 0) + 1
    if data is not None:
        state["last"] = data
    return state


def arm(preferences, state, data):
    state["wake_at"] = data["at"]
    return state


def wake(preferences, state, data):
    state["woke_at"] = data["now"]
    return state


def wake_due(preferences, state):
    return None if "woke_at" in state or "wake_at" not in state else state["wake_at"]


def record(change):
    """Fails while fail.flag exists; otherwise notes the change in listened.txt."""
    if (HERE / "fail.flag").exists():
        raise RuntimeError((HERE / "fail.flag").read_text() or "listener exploded")
    if (HERE / "slow.flag").exists():
        time.sleep(float((HERE / "slow.flag").read_text() or 2))
    with open(HERE / "listened.txt", "a") as f:
        f.write(f"{{change.id}} {{change.seq}}\\n")
    logging.getLogger("cliapp").info("recorded %s %s", change.id, change.seq)


def upgrade(preferences, old_version, state):
    return {{**state, "upgraded_from": old_version}}


def make_app(store=STORE):
    return casern.Casern(
        store,
        {{}},
        {{}},
        {{"inc": inc, "arm": arm, "wake": wake}},
        {{"record": record}},
        timers={{"wake": wake_due}},
        state_version=int(os.environ.get("CLI_TEST_VERSION", "1")),
        upgrade=upgrade,
        backoff=casern.Backoff(attempts=2, initial=0.01, maximum=0.02, timeout=5),
        tick=0.1,
    )
'''


def casern_script() -> str:
    """The installed console script, beside this Python."""
    path = Path(sys.executable).parent / "casern"
    found = str(path) if path.exists() else shutil.which("casern")
    assert found, "the casern console script is not installed (pip install -e .)"
    return found


class CLIApp:
    """A test app module in its own directory, and ways to run the CLI on it."""

    def __init__(self, root: Path, store: str) -> None:
        self.root = root
        self.store = store
        self.module = f"cliapp_{uuid.uuid4().hex[:10]}"
        (root / f"{self.module}.py").write_text(TEST_APP.format(store=store))
        self.ref = f"{self.module}:make_app"

    def invoke(
        self, *args: str, env: dict[str, str] | None = None, input: str | None = None
    ) -> Result:
        """Run the CLI in this process (click's CliRunner)."""
        runner = CliRunner()
        return runner.invoke(
            cli, ["--app", self.ref, "--store", self.store, *args], env=env, input=input
        )

    def run(
        self, *args: str, env: dict[str, str] | None = None, app: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run the installed console script in a subprocess, in the module's directory."""
        prefix = ["--app", self.ref, "--store", self.store] if app else []
        return subprocess.run(
            [casern_script(), *prefix, *args],
            cwd=self.root,
            env=self.env(env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    @contextmanager
    def start(self, *args: str, sigint_ignored: bool = False) -> Iterator[subprocess.Popen[str]]:
        """The console script on this app, running in the background (stdout/stderr piped,
        for the test to read while it runs); killed on the way out if still running.

        `sigint_ignored`: started as by `casern worker &` in a script, SIGINT ignored.
        """
        command = [casern_script(), "--app", self.ref, "--store", self.store, *args]
        with subprocess.Popen(
            [*SIGINT_IGNORED, *command] if sigint_ignored else command,
            cwd=self.root,
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as proc:  # closes the pipes and waits
            try:
                yield proc
            finally:
                if proc.poll() is None:
                    proc.kill()

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {**os.environ, "PYTHONPATH": str(self.root), **(extra or {})}
        env.pop("CASERN_APP", None)
        return env

    def listened(self) -> list[str]:
        path = self.root / "listened.txt"
        return path.read_text().split() if path.exists() else []

    def make(self) -> casern.Casern:
        """The same app, opened directly (to set up or check what the CLI did)."""
        return load_app(self.ref, self.store)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The CLI configures the casern logger; give the rest of the suite its own back."""
    saved = {
        name: (logging.getLogger(name).level, list(logging.getLogger(name).handlers))
        for name in ("casern", "apscheduler")
    }
    yield
    for name, (level, handlers) in saved.items():
        logging.getLogger(name).setLevel(level)
        logging.getLogger(name).handlers[:] = handlers


@pytest.fixture
def cli_app(tmp_path: Path, store_url: str, monkeypatch: pytest.MonkeyPatch) -> CLIApp:
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("CASERN_APP", raising=False)
    monkeypatch.delenv("CASERN_STORE", raising=False)
    return CLIApp(tmp_path, store_url)


@pytest.fixture
def opened(cli_app: CLIApp) -> Iterator[Callable[[], casern.Casern]]:
    """Open the app directly; every app opened this way is closed at the end."""
    apps: list[casern.Casern] = []

    def open_() -> casern.Casern:
        apps.append(cli_app.make())
        return apps[-1]

    yield open_
    for app in apps:
        app.close()


def assert_one_line_error(stderr: str, *fragments: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("casern: error: "), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], stderr


# -- in process (CliRunner) -------------------------------------------------------------


def test_send_prints_the_committed_state_and_runs_listeners_before_exiting(
    cli_app: CLIApp,
) -> None:
    result = cli_app.invoke("send", "inc", "cart-1", '{"sku": "A-1", "qty": 2}')
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"n": 1, "last": {"sku": "A-1", "qty": 2}}
    assert "\n" not in result.stdout.strip()  # compact when not on a terminal
    assert cli_app.listened() == ["cart-1", "1"]

    result = cli_app.invoke("send", "inc", "cart-1")
    assert json.loads(result.stdout) == {"n": 2, "last": {"sku": "A-1", "qty": 2}}


def test_send_reads_json_from_stdin_and_honours_the_idempotency_key(cli_app: CLIApp) -> None:
    first = cli_app.invoke("send", "inc", "x", "-", "--key", "k1", input="[1, 2]")
    again = cli_app.invoke("send", "inc", "x", "-", "--key", "k1", input="[1, 2]")
    assert first.exit_code == again.exit_code == 0, first.output + again.output
    assert json.loads(first.stdout) == json.loads(again.stdout) == {"n": 1, "last": [1, 2]}


def test_send_refuses_bad_json_with_a_usage_error(cli_app: CLIApp) -> None:
    result = cli_app.invoke("send", "inc", "x", "{qty: 2}")
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, "not valid JSON", "casern send --help")
    assert cli_app.invoke("show", "x").exit_code == 1  # nothing was written


def test_show_prints_the_state_and_exits_1_for_an_unknown_id(cli_app: CLIApp) -> None:
    cli_app.invoke("send", "inc", "order/17 ü", '"hi"')
    result = cli_app.invoke("show", "order/17 ü")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"n": 1, "last": "hi"}

    result = cli_app.invoke("show", "order-18")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert_one_line_error(result.stderr, "no machine 'order-18'", "casern ls")


def test_history_lists_every_change_oldest_first(cli_app: CLIApp) -> None:
    for n in range(3):
        cli_app.invoke("send", "inc", "h", json.dumps({"n": n}))
    result = cli_app.invoke("history", "h")
    assert result.exit_code == 0, result.output
    entries = json.loads(result.stdout)
    assert [e["seq"] for e in entries] == [1, 2, 3]
    assert [e["data"] for e in entries] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert {e["reducer"] for e in entries} == {"inc"}
    assert all(e["applied_at"] and e["version"] == 1 for e in entries)

    unknown = cli_app.invoke("history", "nope")
    assert unknown.exit_code == 1
    assert_one_line_error(unknown.stderr, "no machine 'nope'")


def test_ls_pages_through_every_id_with_prefix_and_limit(
    cli_app: CLIApp, opened: Callable[[], casern.Casern]
) -> None:
    app = opened()
    ids = [f"a-{i:04d}" for i in range(1203)] + ["b-1", "b-2"]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda id: app.send("inc", id), ids))
    app.close()

    result = cli_app.invoke("ls")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == sorted(ids)  # more than one page of 1,000
    assert cli_app.invoke("ls", "--prefix", "b-").stdout.splitlines() == ["b-1", "b-2"]
    limited = cli_app.invoke("ls", "--prefix", "a-", "--limit", "1001").stdout.splitlines()
    assert limited == sorted(ids)[:1001]
    after = cli_app.invoke("ls", "--after", "a-1201").stdout.splitlines()
    assert after == ["a-1202", "b-1", "b-2"]


def test_failed_lists_exhausted_deliveries_and_retry_requeues_them(cli_app: CLIApp) -> None:
    assert cli_app.invoke("failed").stdout.strip() == "No failed deliveries."
    (cli_app.root / "fail.flag").touch()
    cli_app.invoke("send", "inc", "f1")
    cli_app.invoke("send", "inc", "f2")

    table = cli_app.invoke("failed")
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["ID", "SEQ", "LISTENER", "ATTEMPTS", "ERROR"]
    assert [line.split()[:4] for line in lines[1:]] == [
        ["f1", "1", "record", "2"],
        ["f2", "1", "record", "2"],
    ]
    assert "RuntimeError: listener exploded" in lines[1]
    rows = json.loads(cli_app.invoke("failed", "--json").stdout)
    assert [(r["id"], r["seq"], r["listener"], r["attempts"]) for r in rows] == [
        ("f1", 1, "record", 2),
        ("f2", 1, "record", 2),
    ]

    (cli_app.root / "fail.flag").unlink()  # the cause is fixed
    result = cli_app.invoke("retry", "f1")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "1 failed delivery re-queued"
    assert cli_app.listened() == ["f1", "1"]
    assert [r["id"] for r in json.loads(cli_app.invoke("failed", "--json").stdout)] == ["f2"]
    assert cli_app.invoke("retry").stdout.strip() == "1 failed delivery re-queued"
    assert json.loads(cli_app.invoke("failed", "--json").stdout) == []
    assert cli_app.invoke("retry").stdout.strip() == "0 failed deliveries re-queued"


def test_failed_keeps_one_row_per_delivery_for_a_multi_line_error(cli_app: CLIApp) -> None:
    (cli_app.root / "fail.flag").write_text("connect failed:\n\thost smtp.example.org\r\n")
    cli_app.invoke("send", "inc", "f1")
    lines = cli_app.invoke("failed").stdout.splitlines()
    assert len(lines) == 2, lines  # was 4: the error's own lines broke the table
    assert "RuntimeError: connect failed: host smtp.example.org" in lines[1]
    [row] = json.loads(cli_app.invoke("failed", "--json").stdout)
    assert "connect failed:\n\thost smtp.example.org" in row["error"]  # --json keeps it all


def test_migrate_upgrades_every_stored_state(
    cli_app: CLIApp, opened: Callable[[], casern.Casern]
) -> None:
    app = opened()
    for i in range(5):
        app.send("inc", f"m{i}")
    app.close()

    result = cli_app.invoke("migrate", "--batch", "2", env={"CLI_TEST_VERSION": "2"})
    assert result.exit_code == 0, result.output
    assert "Migrating" in result.stderr
    assert result.stdout.strip() == "5 of 5 stored state(s) upgraded to state_version 2"
    shown = cli_app.invoke("show", "m3", env={"CLI_TEST_VERSION": "2"})
    assert json.loads(shown.stdout) == {"n": 1, "upgraded_from": 1}

    again = cli_app.invoke("migrate", env={"CLI_TEST_VERSION": "2"})
    assert again.stdout.strip() == "0 of 5 stored state(s) upgraded to state_version 2"


def test_worker_once_fires_due_timers(cli_app: CLIApp) -> None:
    cli_app.invoke("send", "arm", "t1", json.dumps({"at": time.time() - 1}))
    result = cli_app.invoke("worker", "--once")
    assert result.exit_code == 0, result.output
    assert "fired 1 due timer(s)" in result.stderr
    assert "woke_at" in json.loads(cli_app.invoke("show", "t1").stdout)


def test_worker_logs_no_http_request_lines_and_leaves_later_commands_quiet(
    cli_app: CLIApp,
) -> None:
    result = cli_app.invoke("worker", "--once")
    assert result.exit_code == 0, result.output
    assert "HTTP Request" not in result.stderr  # httpx logs every request at INFO
    failed = cli_app.invoke("send", "nope", "x")
    assert failed.exit_code == 1
    assert failed.stderr.splitlines() == [
        "casern: error: no reducer named 'nope' (known: arm, inc, wake)"
    ]


def test_app_may_be_an_instance_or_come_from_the_environment(
    cli_app: CLIApp, tmp_path: Path
) -> None:
    module = f"cliinstance_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(
        f"from {cli_app.module} import make_app\napp = make_app()\n"
    )
    result = CliRunner().invoke(cli, ["--app", f"{module}:app", "send", "inc", "i1"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["show", "i1"], env={"CASERN_APP": cli_app.ref})
    assert json.loads(result.stdout) == {"n": 1}


@pytest.mark.parametrize(
    ("args", "code", "fragments"),
    [
        (["--app", "no_such_module_xyz:app", "ls"], 2, ["cannot import 'no_such_module_xyz'"]),
        (["--app", "json:no_such_attr", "ls"], 2, ["no attribute 'no_such_attr'", "MODULE:ATTR"]),
        (["--app", "json", "ls"], 2, ["not MODULE:ATTRIBUTE"]),
        (["--app", "os:getcwd", "ls"], 2, ["returned", "not a casern.Casern"]),
        (["--app", "json:__doc__", "ls"], 2, ["is a str"]),
        (["ls"], 2, ["no app given", "CASERN_APP"]),
        (["--app", "os:getcwd", "--store", "sqlite://", "ls"], 2, ["not a casern.Casern"]),
        (["nonsense"], 2, ["No such command 'nonsense'"]),
    ],
)
def test_a_bad_app_or_command_is_a_one_line_usage_error(
    args: list[str], code: int, fragments: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CASERN_APP", raising=False)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == code, result.output
    assert_one_line_error(result.stderr, *fragments)


def test_casern_errors_exit_1_with_one_line_and_debug_shows_the_traceback(
    cli_app: CLIApp,
) -> None:
    for args, fragment in [
        (["send", "nope", "x"], "no reducer named 'nope' (known: arm, inc, wake)"),
        (["send", "inc", "_design"], "must not start with '_'"),
        (["show", "x" * 2000], "at most 1024 characters"),
    ]:
        result = cli_app.invoke(*args)
        assert result.exit_code == 1, result.output
        assert_one_line_error(result.stderr, fragment)

    debug = CliRunner().invoke(
        cli, ["--debug", "--app", cli_app.ref, "--store", cli_app.store, "send", "nope", "x"]
    )
    assert debug.exit_code == 1
    assert "Traceback" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith("casern: error: no reducer")


BAD_STORE_URLS = [
    ("postgres://x", "unknown store URL 'postgres://x': use sqlite:///file.db"),
    ("http://127.0.0.1:5984", "ends with the database name, as in http://user:pass@host:5984/"),
    ("http://127.0.0.1:5984/Orders", "'Orders' is not a CouchDB database name"),
    ("sqlite:orders.db", "not an sqlite URL: 'sqlite:orders.db'; use sqlite:///relative.db"),
]


@pytest.mark.parametrize(("url", "fragment"), BAD_STORE_URLS)
def test_a_bad_store_url_is_named_as_such_not_blamed_on_the_app_factory(
    url: str, fragment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("CASERN_APP", raising=False)
    good, typo = CLIApp(tmp_path, "sqlite://"), CLIApp(tmp_path, url)
    given = CliRunner().invoke(cli, ["--app", good.ref, "--store", url, "ls"])
    assert given.exit_code == 2, given.output  # a usage mistake
    assert_one_line_error(given.stderr, "bad --store: ", fragment)
    own = CliRunner().invoke(cli, ["--app", typo.ref, "ls"])  # the factory's own URL
    assert own.exit_code == 1, own.output
    assert_one_line_error(own.stderr, f"bad store URL of --app {typo.ref}: ", fragment)
    for result in (given, own):
        assert "factory" not in result.stderr
        forms = ("sqlite:///relative.db", "sqlite:///file.db", "user:pass@host:5984/dbname")
        assert any(form in result.stderr for form in forms)  # what it accepts


def test_store_urls_are_redacted_in_messages(cli_app: CLIApp) -> None:
    result = CliRunner().invoke(
        cli, ["--app", cli_app.ref, "--store", "gopher://ann:s3cret@127.0.0.1/db", "ls"]
    )
    assert result.exit_code == 2
    assert "s3cret" not in result.output


def test_the_readme_names_the_app_before_the_command() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    shown = re.findall(r"`(casern [^`]*)`", readme) + re.findall(r"\n {4}(casern .*)", readme)
    assert len(shown) > 10
    for command in shown:
        words = command.split()
        names = [i for i, w in enumerate(words) if w in cli.commands]
        if "--app" in words and names:
            assert words.index("--app") < names[0], f"README: {command!r}: --app goes first"


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["send"],
        ["show"],
        ["history"],
        ["ls"],
        ["failed"],
        ["retry"],
        ["worker"],
        ["migrate"],
        ["demo"],
    ],
)
def test_every_command_has_help(command: list[str]) -> None:
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"Usage: casern {' '.join(command)}".rstrip() + " ")
    summary = result.stdout.split("\n\n")[1].strip()
    assert summary[0].isupper() and summary.endswith("."), summary


# -- the installed console script, in subprocesses --------------------------------------


def test_console_script_round_trip(cli_app: CLIApp) -> None:
    sent = cli_app.run("send", "inc", "p1", '{"hello": "wörld"}')
    assert sent.returncode == 0, sent.stderr
    assert json.loads(sent.stdout) == {"n": 1, "last": {"hello": "wörld"}}
    assert sent.stderr == ""
    assert cli_app.listened() == ["p1", "1"]  # the listener ran before the process exited

    assert json.loads(cli_app.run("show", "p1").stdout) == {"n": 1, "last": {"hello": "wörld"}}
    assert [e["seq"] for e in json.loads(cli_app.run("history", "p1").stdout)] == [1]
    assert cli_app.run("ls").stdout == "p1\n"
    assert cli_app.run("failed").stdout.strip() == "No failed deliveries."
    assert cli_app.run("retry").stdout.strip() == "0 failed deliveries re-queued"

    migrated = cli_app.run("migrate", env={"CLI_TEST_VERSION": "3"})
    assert migrated.returncode == 0, migrated.stderr
    assert "Migrating" in migrated.stderr
    assert migrated.stdout.strip() == "1 of 1 stored state(s) upgraded to state_version 3"

    unknown = cli_app.run("show", "p2")
    assert unknown.returncode == 1
    assert_one_line_error(unknown.stderr, "no machine 'p2'")

    bad_json = cli_app.run("send", "inc", "p1", "{oops")
    assert bad_json.returncode == 2
    assert_one_line_error(bad_json.stderr, "not valid JSON")

    bad_app = cli_app.run("--app", "nowhere_xyz:app", "ls", app=False)
    assert bad_app.returncode == 2
    assert_one_line_error(bad_app.stderr, "cannot import 'nowhere_xyz'", "PYTHONPATH")


def test_console_script_finds_the_app_module_in_the_current_directory(cli_app: CLIApp) -> None:
    env = cli_app.env()
    env.pop("PYTHONPATH")
    result = subprocess.run(
        [casern_script(), "--app", cli_app.ref, "--store", cli_app.store, "ls"],
        cwd=cli_app.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_json_is_indented_on_a_terminal(cli_app: CLIApp) -> None:
    cli_app.run("send", "inc", "tty", '{"a": 1}')
    leader, follower = os.openpty()
    try:
        proc = subprocess.run(
            [casern_script(), "--app", cli_app.ref, "--store", cli_app.store, "show", "tty"],
            cwd=cli_app.root,
            env=cli_app.env(),
            stdout=follower,
            stderr=subprocess.PIPE,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        out = os.read(leader, 65536).decode().replace("\r\n", "\n")
    finally:
        os.close(leader)
        os.close(follower)
    assert out == json.dumps({"n": 1, "last": {"a": 1}}, indent=2) + "\n"


def test_worker_fires_timers_and_stops_cleanly_on_sigterm(cli_app: CLIApp) -> None:
    cli_app.run("send", "arm", "w1", json.dumps({"at": time.time() + 0.5}))
    with cli_app.start("worker") as proc:
        deadline = time.monotonic() + 30
        state: dict[str, Any] = {}
        while time.monotonic() < deadline and "woke_at" not in state:
            time.sleep(0.2)
            state = json.loads(cli_app.run("show", "w1").stdout)
        assert "woke_at" in state, "the worker did not fire the due timer"
        assert state["woke_at"] >= state["wake_at"]  # never before its due time
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert "worker started on" in err
    assert "got SIGTERM, stopping" in err
    assert err.strip().splitlines()[-1].endswith("worker stopped")
    assert cli_app.listened() == ["w1", "1", "w1", "2"]  # the timer's change was delivered too


def test_worker_logs_listeners_and_says_what_it_waits_for_when_stopped(
    cli_app: CLIApp, opened: Callable[[], casern.Casern]
) -> None:
    cli_app.run("send", "arm", "w1", json.dumps({"at": time.time() + 0.5}))
    (cli_app.root / "slow.flag").touch()  # the timer's listener runs 2 s in the worker
    with cli_app.start("worker") as proc:
        deadline = time.monotonic() + 30
        state: dict[str, Any] = {}
        reader = opened()
        while time.monotonic() < deadline and "woke_at" not in state:
            time.sleep(0.02)
            state = reader.get("w1") or {}
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "waiting up to 10s for the listeners of 1 change(s) under way" in err
    assert "cliapp INFO: recorded w1 2" in err  # the listener's own log, through the root
    assert "apscheduler" not in err and "Running job" not in err
    assert err.strip().splitlines()[-1].endswith("worker stopped")
    assert cli_app.listened() == ["w1", "1", "w1", "2"]


@pytest.mark.parametrize(
    ("stop", "sigint_ignored"),
    [(signal.SIGINT, False), (signal.SIGINT, True), (signal.SIGTERM, True)],
    ids=["ctrl-c", "ctrl-c-started-with-sigint-ignored", "sigterm-started-with-sigint-ignored"],
)
def test_a_second_ctrl_c_leaves_the_listeners_under_way_and_exits_at_once(
    cli_app: CLIApp, opened: Callable[[], casern.Casern], stop: int, sigint_ignored: bool
) -> None:
    cli_app.run("send", "arm", "w1", json.dumps({"at": time.time() + 0.5}))
    # The timer's listener runs 8 s: less than close()'s 10 s wait for listeners, which the
    # second signal must cut short, and long enough for a loaded CI machine to exit in
    # (with 4 s the listener finished first, once in CI).
    (cli_app.root / "slow.flag").write_text("8")
    with cli_app.start("worker", sigint_ignored=sigint_ignored) as proc:
        deadline = time.monotonic() + 30
        reader = opened()
        while time.monotonic() < deadline and not reader.inspect("w1")["pending"]:  # type: ignore[index]
            time.sleep(0.02)
        proc.send_signal(stop)
        assert proc.stderr is not None
        seen = []  # kept for the messages below: communicate() returns only the rest
        while time.monotonic() < deadline and (line := proc.stderr.readline()):
            seen.append(line)
            if "again to leave them" in line:
                break
        proc.send_signal(stop)  # before: ignored if SIGINT was, SIGTERM killed it outright
        again = time.monotonic()
        _, rest = proc.communicate(timeout=30)
        took = time.monotonic() - again
        err = "".join(seen) + rest
    assert proc.returncode == 0, err
    assert "left the listeners still under way in the outbox for the next worker" in err
    assert err.strip().splitlines()[-1].endswith("worker stopped")
    # It exited without waiting for the listener (before: the exit hook closed the app
    # again and waited up to 10 s, letting the listener finish).
    assert cli_app.listened() == ["w1", "1"], f"exited {took:.1f} s after the second: {err}"
    pending = reader.inspect("w1")["pending"]  # type: ignore[index]
    assert [entry["seq"] for entry in pending] == [2]  # left for the next worker


def test_ctrl_c_while_send_waits_for_its_listeners_exits_at_once(cli_app: CLIApp) -> None:
    # The listener runs 8 s: less than close()'s 10 s wait for listeners, which Ctrl-C must
    # cut short, and long enough for a loaded CI machine to exit in (4 s failed once there).
    (cli_app.root / "slow.flag").write_text("8")
    with cli_app.start("send", "inc", "s1") as proc:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline()) == {"n": 1}  # committed; listener running
        interrupted = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - interrupted
    assert proc.returncode != 0 and "Traceback" not in err, err
    # Before, close() then waited up to 10 s more, and the listener finished.
    assert cli_app.listened() == [], f"exited {took:.1f} s after Ctrl-C; stderr: {err}"
    later = cli_app.make()
    try:
        assert [e["seq"] for e in later.inspect("s1")["pending"]] == [1]  # type: ignore[index]
    finally:
        later.close(timeout=0)


def test_store_overrides_the_store_of_an_app_instance(tmp_path: Path) -> None:
    (tmp_path / "instance_app.py").write_text(
        "import casern\n"
        "app = casern.Casern('sqlite://', {}, {},\n"
        "                    {'inc': lambda p, s, d: {'n': s.get('n', 0) + 1}}, {})\n"
    )
    store = f"sqlite:///{tmp_path}/other.db"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    for _ in range(2):
        result = subprocess.run(
            [casern_script(), "--app", "instance_app:app", "--store", store, "send", "inc", "x"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"n": 2}  # both sends went to other.db, not memory


def test_find_prints_matching_ids_one_per_line(
    cli_app: CLIApp, opened: Callable[[], casern.Casern]
) -> None:
    app = opened()
    for i in range(1205):
        app.send("inc", f"m-{i:04d}", {"team": "a" if i % 2 else "b"})
    app.close()

    every = [f"m-{i:04d}" for i in range(1, 1205, 2)]
    result = cli_app.invoke("find", '{"last.team": "a"}')
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == every
    paged = cli_app.invoke("find", '{"last.team": {"$in": ["a"]}}', "--after", "m-0003")
    assert paged.stdout.splitlines() == every[2:]
    limited = cli_app.invoke("find", '{"last.team": "a"}', "--limit", "1001")
    assert limited.stdout.splitlines() == every[:1001]  # more than one page of 1,000
    assert cli_app.invoke("find", '{"last.team": "c"}').stdout == ""


def test_find_refuses_a_selector_in_one_line(cli_app: CLIApp) -> None:
    bad_json = cli_app.invoke("find", "{status: open}")
    assert bad_json.exit_code == 2
    assert "SELECTOR" in bad_json.stderr and "is not valid JSON" in bad_json.stderr
    bad_query = cli_app.invoke("find", '{"status": {"$regex": "o"}}')
    assert bad_query.exit_code == 1
    assert bad_query.stderr.strip() == (
        "casern: error: unknown operator '$regex' on field 'status'"
        " (supported: $eq $ne $gt $gte $lt $lte $in $nin $exists)"
    )
