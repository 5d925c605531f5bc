"""`casern inspect` started for real as a subprocess on a free loopback port, on every
store: it serves the pages and the API, refuses to listen on the network without a
token, answers only loopback Host names without one (DNS rebinding), and stops on
SIGINT.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

import casern
from _couch import free_port
from _process import output, running

APP = """
import casern


def inc(preferences, state, data):
    return {**state, "n": state.get("n", 0) + 1, "last": data}


def make_app(store="sqlite://"):
    return casern.Casern(store, {}, {}, {"inc": inc}, {})
"""


def casern_script() -> str:
    return str(Path(sys.executable).parent / "casern")


@pytest.fixture
def app_module(tmp_path: Path) -> str:
    name = f"inspectapp_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(APP)
    return f"{name}:make_app"


@contextmanager
def inspector(
    cwd: Path, ref: str, store: str, *args: str, port: int | None = None
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """`casern inspect` in a subprocess; yields its base URL once it answers."""
    port = port or free_port()
    base = f"http://127.0.0.1:{port}"
    command = [casern_script(), "--app", ref, "--store", store, "inspect", "--port", str(port)]
    with running([*command, *args], cwd=cwd, probe=base + "/static/inspector.css") as proc:
        yield base, proc


def test_casern_inspect_serves_pages_and_api_and_stops_on_sigint(
    tmp_path: Path, app_module: str, store_url: str
) -> None:
    with casern.Casern(store_url, {}, {}, {"inc": lambda p, s, d: {**s, "d": d}}, {}) as app:
        app.send("inc", "tenant/1", {"hello": "<script>x</script>"})
    with inspector(tmp_path, app_module, store_url) as (base, proc):
        assert httpx.get(base + "/api/machines").json() == {"ids": ["tenant/1"]}
        info = httpx.get(base + "/api/machines/tenant%2F1").json()
        assert info["state"] == {"d": {"hello": "<script>x</script>"}} and info["seq"] == 1
        page = httpx.get(base + "/machines/tenant%2F1")
        assert page.status_code == 200 and "&lt;script&gt;x&lt;/script&gt;" in page.text
        assert "<script>x" not in page.text
        assert httpx.get(base + "/failed").status_code == 200
        rebinding = httpx.get(base + "/api/machines", headers={"host": "evil.example"})
        assert rebinding.status_code == 403 and "--token" in rebinding.text
        assert httpx.get(base + "/", headers={"host": "localhost"}).status_code == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0, output(proc)
        err = output(proc)
        assert "casern inspector for" in err and "Traceback" not in err
        password = httpx.URL(store_url).password
        assert not password or password not in err


def test_casern_inspect_with_a_token_needs_it(tmp_path: Path, app_module: str) -> None:
    store = f"sqlite:///{tmp_path}/s.db"
    with inspector(tmp_path, app_module, store, "--token", "t0ken") as (base, _):
        assert httpx.get(base + "/api/machines").status_code == 401
        auth = {"authorization": "Bearer t0ken"}
        assert httpx.get(base + "/api/machines", headers=auth).json() == {"ids": []}
        # With a token, other Host names are fine: the token is the guard.
        other = httpx.get(base + "/api/machines", headers={**auth, "host": "inspector.internal"})
        assert other.status_code == 200


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.7", "::", "example.org"])
def test_casern_inspect_refuses_a_network_host_without_a_token(
    tmp_path: Path, app_module: str, host: str
) -> None:
    result = subprocess.run(
        [casern_script(), "--app", app_module, "inspect", "--host", host],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "add --token" in result.stderr
    assert "Traceback" not in result.stderr


def test_casern_inspect_on_a_port_in_use_says_so_in_one_line(
    tmp_path: Path, app_module: str
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = subprocess.run(
            [casern_script(), "--app", app_module, "inspect", "--port", str(port)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1, result.stderr
    # Before: the banner ("casern inspector for ... on ...") and then uvicorn's ERROR line.
    assert result.stderr.startswith(f"casern: error: cannot listen on 127.0.0.1:{port}: ")
    assert result.stderr.count("\n") == 1 and "in use" in result.stderr


def test_casern_inspect_help_names_its_options(tmp_path: Path) -> None:
    result = subprocess.run(
        [casern_script(), "inspect", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    for option in ("--host", "--port", "--token", "CASERN_INSPECT_TOKEN", "--log-level"):
        assert option in result.stdout


LOGGING_APP = """
import logging
import casern

def make_app(store="sqlite://"):
    logging.getLogger("myapp").info("app made for the inspector")
    logging.getLogger("casern.mine").info("casern's own line")
    return casern.Casern(store, {}, {}, {"inc": lambda p, s, d: s}, {})
"""


@pytest.mark.parametrize("level", [None, "INFO"])
def test_casern_inspect_log_level_configures_the_root_logger(
    tmp_path: Path, level: str | None
) -> None:
    (tmp_path / "loggingapp.py").write_text(LOGGING_APP)
    store = f"sqlite:///{tmp_path}/x.db"
    args = ["--log-level", level] if level else []
    with inspector(tmp_path, "loggingapp:make_app", store, *args) as (base, proc):
        assert httpx.get(base + "/api/machines").json() == {"ids": []}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0, output(proc)
        err = output(proc)
    shown = "myapp INFO: app made for the inspector" in err, "casern.mine INFO" in err
    assert shown == ((True, True) if level else (False, False)), err  # WARNING by default
