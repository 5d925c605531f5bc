"""The inspector, mounted at /inspector in a host app through ASGI (Starlette) and WSGI
(Werkzeug's dispatcher, as in a Flask app), on every store: the JSON API exactly as the
contract lists it, the pages, ids with `/` in paths, the token, CSRF and escaping.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.test import Client as WerkzeugClient
from werkzeug.wrappers import Response as WerkzeugResponse

import casern
import casern.inspector
from conftest import inc

MOUNTS = ["asgi", "wsgi"]
ORIGIN = "http://testserver"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


@dataclass
class Web:
    """A host web app with the inspector mounted at /inspector, and a client for it."""

    kind: str
    app: casern.Casern
    token: str | None = None
    cookies: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind == "asgi":
            self.asgi = Starlette(
                routes=[Mount("/inspector", app=casern.inspector.asgi(self.app, self.token))]
            )
        else:
            host = DispatcherMiddleware(
                WerkzeugResponse("host app", 404),
                {"/inspector": casern.inspector.wsgi(self.app, self.token)},
            )
            self.wsgi = WerkzeugClient(host, use_cookies=False)

    def request(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        json_body: Any = None,
    ) -> Reply:
        headers = {"host": "testserver", **(headers or {})}
        if self.cookies:
            headers["cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        if json_body is not None:
            body, headers["content-type"] = json.dumps(json_body).encode(), "application/json"
        url = "/inspector" + path
        if self.kind == "asgi":

            async def go() -> httpx.Response:
                transport = httpx.ASGITransport(app=self.asgi)
                async with httpx.AsyncClient(transport=transport, base_url=ORIGIN) as client:
                    return await client.request(method, url, headers=headers, content=body)

            r = asyncio.run(go())
            return Reply(r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.text)
        w = self.wsgi.open(url, method=method, headers=headers, data=body)
        return Reply(
            w.status_code, {k.lower(): v for k, v in w.headers.items()}, w.get_data(as_text=True)
        )

    def get(self, path: str, **kw: Any) -> Reply:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> Reply:
        return self.request("POST", path, **kw)


@pytest.fixture(params=MOUNTS)
def mount(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def web(mount: str, make_app: Callable[..., casern.Casern]) -> Callable[..., Web]:
    def make(app: casern.Casern | None = None, token: str | None = None) -> Web:
        return Web(mount, app if app is not None else make_app(), token)

    return make


def enc(id: str) -> str:
    """An id as a path segment, as the contract says (`/` as %2F; dot segments too)."""
    quoted = quote(id, safe="")
    return quoted.replace(".", "%2E") if quoted in (".", "..") else quoted


class Flaky:
    """A listener that fails until told to work, and counts its successful calls."""

    def __init__(self) -> None:
        self.works = False
        self.ok: list[tuple[str, int]] = []

    def __call__(self, change: casern.Change) -> None:
        if not self.works:
            raise RuntimeError("smtp is down <b>bold</b>")
        self.ok.append((change.id, change.seq))


def status_reducer(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
    return {**state, **data}


# -- machines: paged by prefix -----------------------------------------------------------


def test_machines_api_pages_ids_by_prefix_and_after(web: Callable[..., Web]) -> None:
    w = web()
    for i in range(7):
        w.app.send("inc", f"conv-{i:02d}")
    w.app.send("inc", "order-1")
    assert w.get("/api/machines").json() == {
        "ids": [*(f"conv-{i:02d}" for i in range(7)), "order-1"]
    }
    assert w.get("/api/machines?prefix=conv-&limit=3").json() == {
        "ids": ["conv-00", "conv-01", "conv-02"]
    }
    assert w.get("/api/machines?prefix=conv-&after=conv-04").json() == {
        "ids": ["conv-05", "conv-06"]
    }
    assert w.get("/api/machines?prefix=nothing").json() == {"ids": []}
    assert w.get("/api/machines?limit=x").status == 400
    assert w.get("/api/machines?limit=0").status == 400


def test_machines_page_pages_with_a_next_link(web: Callable[..., Web]) -> None:
    w = web()
    ids = [f"m-{i:03d}" for i in range(60)]
    for id in ids:
        w.app.send("inc", id)
    first = w.get("/")
    assert first.status == 200
    assert 'href="/inspector/machines/m-049"' in first.text
    assert "m-050" not in first.text  # 50 a page
    assert 'href="/inspector/?after=m-049"' in first.text
    second = w.get("/?after=m-049")
    assert 'href="/inspector/machines/m-059"' in second.text
    assert 'href="/inspector/machines/m-049"' not in second.text
    assert "Next" not in second.text
    filtered = w.get("/?prefix=m-01")
    assert filtered.text.count('href="/inspector/machines/m-01') == 10


def test_machines_are_found_by_a_selector_and_paged(
    web: Callable[..., Web], make_app: Callable[..., casern.Casern]
) -> None:
    app = make_app({"set": status_reducer}, indexes=("status",))
    w = web(app)
    for i in range(6):
        app.send("set", f"t-{i}", {"status": "open" if i % 2 else "closed", "team": "a"})
    selector = quote(json.dumps({"status": "open"}))
    assert w.get(f"/api/machines?selector={selector}").json() == {"ids": ["t-1", "t-3", "t-5"]}
    assert w.get(f"/api/machines?selector={selector}&limit=1&after=t-1").json() == {"ids": ["t-3"]}
    page = w.get(f"/?selector={selector}")
    assert page.status == 200
    assert page.text.count('href="/inspector/machines/t-') == 3
    assert 'href="/inspector/machines/t-0"' not in page.text
    bad = w.get("/api/machines?selector=" + quote('{"status": {"$regex": "o"}}'))
    assert bad.status == 400 and "$regex" in bad.json()["error"]
    bad_page = w.get("/?selector=" + quote('{"status": {"$regex": "o"}}'))
    assert bad_page.status == 400 and "$regex" in bad_page.text


def test_a_selector_that_is_not_json_is_refused_with_a_hint(web: Callable[..., Web]) -> None:
    w = web()
    reply = w.get("/api/machines?selector=" + quote("{status: open"))
    assert reply.status == 400
    assert "not JSON" in reply.json()["error"]
    page = w.get("/?selector=" + quote("[1]"))
    assert page.status == 400 and "a selector is a JSON object" in page.text
    both = w.get("/api/machines?prefix=a&selector=" + quote('{"a": 1}'))
    assert both.status == 400 and "not both" in both.json()["error"]


# -- one machine -------------------------------------------------------------------------


def test_machine_api_shows_state_seq_version_due_pending_and_failed(
    web: Callable[..., Web], make_app: Callable[..., casern.Casern]
) -> None:
    release = threading.Event()
    flaky = Flaky()

    def slow(change: casern.Change) -> None:
        release.wait(10)

    app = make_app(
        {"set": status_reducer, "wake": status_reducer},
        {"mail": flaky},
        timers={"wake": lambda prefs, s: 4_000_000_000.0 if s.get("status") == "open" else None},
    )
    w = web(app)
    app.send("set", "t-1", {"status": "open"})
    app.drain()
    info = w.get("/api/machines/t-1").json()
    assert info["state"] == {"status": "open"}
    assert (info["seq"], info["version"]) == (1, 1)
    assert info["due"] == {"wake": 4_000_000_000.0}
    assert [(f["seq"], f["listener"], f["attempts"]) for f in info["failed"]] == [(1, "mail", 3)]
    assert "smtp is down" in info["failed"][0]["error"]
    assert set(info) >= {"state", "seq", "version", "due", "pending", "failed"}

    other = make_app({"set": status_reducer}, {"slow": slow})
    w2 = Web(w.kind, other)
    other.send("set", "t-2", {"status": "busy"})
    try:
        pending = w2.get("/api/machines/t-2").json()["pending"]
        assert [(p["seq"], p["reducer"], p["listeners"]) for p in pending] == [(1, "set", ["slow"])]
    finally:
        release.set()


def test_ids_with_slashes_spaces_and_unicode_round_trip_in_paths(
    web: Callable[..., Web],
) -> None:
    w = web()
    odd = ["tenant/42/chat", "a b?c#d", "ünï/cödé", "x%2Fy", "..", "a/history"]
    for id in odd:
        w.app.send("inc", id, {"who": id})
    for id in odd:
        assert w.get(f"/api/machines/{enc(id)}").json()["state"] == {"n": 1, "last": {"who": id}}
        history = w.get(f"/api/machines/{enc(id)}/history").json()
        assert [e["seq"] for e in history["history"]] == [1]
        page = w.get(f"/machines/{enc(id)}")
        assert page.status == 200
        assert f'name="back" value="/machines/{enc(id)}"' in page.text or "None failed" in page.text
    listing = w.get("/").text
    for id in odd:
        assert f'href="/inspector/machines/{enc(id)}"' in listing


def test_an_unknown_machine_is_404_and_an_impossible_id_400(web: Callable[..., Web]) -> None:
    w = web()
    reply = w.get("/api/machines/nobody")
    assert reply.status == 404 and "no machine 'nobody'" in reply.json()["error"]
    assert w.get("/api/machines/nobody/history").status == 404
    page = w.get("/machines/nobody")
    assert page.status == 404 and "no machine" in page.text
    bad = w.get("/api/machines/" + enc("_design/x"))
    assert bad.status == 400 and "error" in bad.json()


def test_an_id_that_is_not_percent_encoded_utf8_is_400_not_another_machine(
    web: Callable[..., Web],
) -> None:
    w = web()
    w.app.send("inc", "\ufffd")  # what a lenient decoder turns a stray byte into
    for path in ("/api/machines/%C3", "/api/machines/%C3/history", "/machines/%FF%FE"):
        reply = w.get(path)
        assert reply.status == 400, (path, reply.text)  # was 200: the machine '\ufffd'
        assert "UTF-8" in reply.text
    assert w.post("/api/retry", json_body={"id": "\ufffd"}).json() == {"retried": 0}


def test_history_api_gives_each_change_with_what_it_changed(web: Callable[..., Web]) -> None:
    w = web()
    w.app.send("inc", "h", {"step": 1})
    w.app.send("inc", "h", {"step": 2})
    history = w.get("/api/machines/h/history").json()
    assert history["note"] is None
    first, second = history["history"]
    assert (first["seq"], first["reducer"], first["data"]) == (1, "inc", {"step": 1})
    assert first["applied_at"] and first["version"] == 1 and first["key"] is None
    assert first["diff"] == [
        {"path": "n", "op": "add", "new": 1},
        {"path": "last", "op": "add", "new": {"step": 1}},
    ]
    assert second["diff"] == [
        {"path": "n", "op": "change", "old": 1, "new": 2},
        {"path": "last.step", "op": "change", "old": 1, "new": 2},
    ]


def test_machine_page_shows_state_timers_and_the_timeline_diff(
    web: Callable[..., Web], make_app: Callable[..., casern.Casern]
) -> None:
    app = make_app(
        {"set": status_reducer, "wake": status_reducer},
        timers={"wake": lambda prefs, s: 4_000_000_000.0},
    )
    w = web(app)
    app.send("set", "p", {"status": "open", "items": [1]})
    app.send("set", "p", {"status": "closed", "items": [1, 2]})
    page = w.get("/machines/p")
    assert page.status == 200
    assert "&#34;status&#34;: &#34;closed&#34;" in page.text  # pretty state JSON, escaped
    assert "<code>wake</code>" in page.text and "2096-10-02" in page.text  # due timer
    assert page.text.count('class="event"') == 2
    assert '<li class="change"><span class="sign">~</span><code class="path">status</code>' in (
        page.text
    )
    assert '<li class="add"><span class="sign">+</span><code class="path">items[1]</code>' in (
        page.text
    )


def test_a_timeline_of_big_values_shows_their_start_and_the_api_all_of_them(
    web: Callable[..., Web], make_app: Callable[..., casern.Casern]
) -> None:
    # Each change of a 100 KB field showed its data, old and new value whole:
    # 300 KB a change, 30 MB for the 100 changes a page shows, reloaded every
    # 3 s with the Live box ticked.
    app = make_app({"set": status_reducer})
    w = web(app)
    for i in range(10):
        app.send("set", "doc", {"body": str(i) * 100_000})
    page = w.get("/machines/doc")
    assert page.status == 200
    assert page.text.count('class="event"') == 10
    assert page.text.count("9" * 100_000) == 1  # the state, whole
    assert len(page.text) < 100_000 + 50_000
    assert "characters in all" in page.text
    history = w.get("/api/machines/doc/history").json()["history"]
    assert [h["data"] for h in history] == [{"body": str(i) * 100_000} for i in range(10)]
    assert history[-1]["diff"] == [
        {"path": "body", "op": "change", "old": "8" * 100_000, "new": "9" * 100_000}
    ]


# -- failed deliveries and retry ---------------------------------------------------------


def test_failed_api_lists_failures_and_retry_api_requeues_them(
    web: Callable[..., Web], make_app: Callable[..., casern.Casern]
) -> None:
    flaky = Flaky()
    app = make_app(listeners={"mail": flaky})
    w = web(app)
    for id in ("f-1", "f-2"):
        app.send("inc", id)
    app.drain()
    failed = w.get("/api/failed").json()["failed"]
    assert sorted((f["id"], f["seq"], f["listener"]) for f in failed) == [
        ("f-1", 1, "mail"),
        ("f-2", 1, "mail"),
    ]
    flaky.works = True
    assert w.post("/api/retry", json_body={"id": "f-1"}).json() == {"retried": 1}
    app.drain()
    assert [f["id"] for f in w.get("/api/failed").json()["failed"]] == ["f-2"]
    assert w.post("/api/retry", json_body={}).json() == {"retried": 1}
    app.drain()
    assert w.get("/api/failed").json() == {"failed": []}
    assert sorted(flaky.ok) == [("f-1", 1), ("f-2", 1)]
    assert w.post("/api/retry").json() == {"retried": 0}  # an empty body is {}
    bad = w.post("/api/retry", body=b"{nope", headers={"content-type": "application/json"})
    assert bad.status == 400 and "JSON" in bad.json()["error"]
    assert w.post("/api/retry", json_body={"id": 3}).status == 400
    assert w.get("/api/failed?limit=0").status == 400


def test_retry_button_posts_the_form_and_comes_back(
    web: Callable[..., Web], make_app: Callable[..., casern.Casern]
) -> None:
    flaky = Flaky()
    app = make_app(listeners={"mail": flaky})
    w = web(app)
    app.send("inc", "r/1")
    app.drain()
    page = w.get("/machines/" + enc("r/1"))
    assert 'id="retry"' in page.text and "smtp is down &lt;b&gt;" in page.text
    assert "Failed deliveries" in w.get("/failed").text
    assert 'href="/inspector/machines/r%2F1"' in w.get("/failed").text
    flaky.works = True
    form = f"id={enc('r/1')}&back={enc('/machines/r%2F1')}".encode()
    reply = w.post(
        "/retry",
        body=form,
        headers={"content-type": "application/x-www-form-urlencoded", "origin": ORIGIN},
    )
    assert reply.status == 303
    assert reply.headers["location"] == "/inspector/machines/r%2F1?retried=1"
    app.drain()
    assert flaky.ok == [("r/1", 1)]
    assert "No failed deliveries" in w.get("/failed?retried=1").text
    assert "Re-queued 1 failed delivery" in w.get("/failed?retried=1").text
    assert "Re-queued" not in w.get("/failed?retried=" + quote("<i>all</i>")).text
    off_site = w.post(
        "/retry",
        body=b"back=//evil.example/",
        headers={"content-type": "application/x-www-form-urlencoded", "origin": ORIGIN},
    )
    assert off_site.headers["location"] == "/inspector/?retried=0"  # never off the site
    backslash = w.post(
        "/retry",
        body=b"back=/%5Cevil.example/",
        headers={"content-type": "application/x-www-form-urlencoded", "origin": ORIGIN},
    )
    assert backslash.headers["location"] == "/inspector/?retried=0"


# -- escaping ----------------------------------------------------------------------------


def test_a_state_holding_markup_is_shown_as_text(web: Callable[..., Web]) -> None:
    w = web()
    evil = "<script>alert(1)</script><img src=x onerror=alert(2)>"
    id = "<b>id</b>"
    w.app.send("inc", id, {"html": evil})
    for path in ("/", f"/machines/{enc(id)}", f"/machines/{enc(id)}?all=1"):
        page = w.get(path)
        assert page.status == 200
        assert "<script>alert" not in page.text and "<img src=x" not in page.text
        assert "<b>id</b>" not in page.text and "&lt;b&gt;id&lt;/b&gt;" in page.text
    machine = w.get(f"/machines/{enc(id)}").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in machine
    csp = w.get("/").headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    api = w.get(f"/api/machines/{enc(id)}")
    assert api.headers["content-type"] == "application/json"
    assert api.headers["x-content-type-options"] == "nosniff"


def test_the_store_url_is_shown_without_credentials(
    web: Callable[..., Web], store_url: str
) -> None:
    w = web()
    w.app.send("inc", "a")
    page = w.get("/machines/a").text
    assert w.app.store.url in page
    password = httpx.URL(store_url).password
    if password:
        assert password not in page and password not in w.get("/").text


# -- token, login cookie, same-origin POSTs ----------------------------------------------


TOKEN = "s3cret-token-for-tests"


def test_with_a_token_every_request_needs_it(web: Callable[..., Web]) -> None:
    w = web(token=TOKEN)
    w.app.send("inc", "a")
    for path in ("/api/machines", "/api/machines/a", "/api/machines/a/history", "/api/failed"):
        reply = w.get(path)
        assert reply.status == 401, path
        assert reply.headers["www-authenticate"].startswith("Bearer")
        assert w.get(path, headers={"authorization": "Bearer wrong"}).status == 401
        assert w.get(path, headers={"authorization": f"Bearer {TOKEN}"}).status == 200
    assert w.post("/api/retry", json_body={}).status == 401
    ok = w.post("/api/retry", json_body={}, headers={"authorization": f"Bearer {TOKEN}"})
    assert ok.json() == {"retried": 0}
    page = w.get("/machines/a")
    assert page.status == 401 and 'name="token"' in page.text and "&#34;n&#34;" not in page.text
    back_to = w.get("/machines/" + enc("a/b"))
    assert 'name="next" value="/machines/a%2Fb"' in back_to.text
    assert w.get("/static/inspector.css").status == 200  # the login page's style
    for sneaky in ("/static/../api/machines", "/login/../api/machines", "/loginx"):
        assert w.get(sneaky).status in (401, 404), sneaky


def test_the_login_form_sets_a_cookie_that_is_not_the_token(web: Callable[..., Web]) -> None:
    w = web(token=TOKEN)
    w.app.send("inc", "a")
    form = {"content-type": "application/x-www-form-urlencoded", "origin": ORIGIN}
    wrong = w.post("/login", body=b"token=nope&next=/machines/a", headers=form)
    assert wrong.status == 401 and "Wrong token" in wrong.text
    right = w.post("/login", body=f"token={TOKEN}&next=/machines/a".encode(), headers=form)
    assert right.status == 303 and right.headers["location"] == "/inspector/machines/a"
    cookie = right.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and TOKEN not in cookie
    name, _, rest = cookie.partition("=")
    w.cookies[name] = rest.partition(";")[0]
    page = w.get("/machines/a")
    assert page.status == 200 and "Log out" in page.text
    assert w.get("/api/machines").json() == {"ids": ["a"]}
    # With the cookie alone, a POST must come from the inspector's own origin.
    assert w.post("/api/retry", json_body={}, headers={"origin": ORIGIN}).status == 200
    evil = w.post("/api/retry", json_body={}, headers={"origin": "http://evil.example"})
    assert evil.status == 403 and "cross-site" in evil.json()["error"]
    sneaky = w.post("/api/retry", json_body={}, headers={"sec-fetch-site": "cross-site"})
    assert sneaky.status == 403
    out = w.post("/logout", headers={"origin": ORIGIN})
    assert out.status == 303 and 'casern_inspector=""' in out.headers["set-cookie"]


def test_without_a_token_a_cross_site_post_is_still_refused(web: Callable[..., Web]) -> None:
    w = web()
    evil = w.post("/api/retry", json_body={}, headers={"origin": "http://evil.example"})
    assert evil.status == 403
    form = w.post(
        "/retry",
        body=b"back=/failed",
        headers={"content-type": "application/x-www-form-urlencoded", "origin": "null"},
    )
    assert form.status == 403
    assert w.post("/api/retry", json_body={}).json() == {"retried": 0}  # curl, a script


def test_a_bearer_token_posts_from_anywhere(web: Callable[..., Web]) -> None:
    w = web(token=TOKEN)
    reply = w.post(
        "/api/retry",
        json_body={},
        headers={"authorization": f"Bearer {TOKEN}", "origin": "http://elsewhere.example"},
    )
    assert reply.json() == {"retried": 0}  # a page elsewhere cannot know the token


def test_an_empty_token_is_refused(make_app: Callable[..., casern.Casern]) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        casern.inspector.asgi(make_app(), token="")


def test_a_factory_is_called_per_request(make_app: Callable[..., casern.Casern]) -> None:
    app = make_app()
    app.send("inc", "lazy")
    holder: dict[str, casern.Casern] = {}
    w = Web("asgi", app)
    w.asgi = Starlette(
        routes=[Mount("/inspector", app=casern.inspector.asgi(lambda: holder["app"]))]
    )
    holder["app"] = app  # built after the mount, like a FastAPI lifespan app
    assert w.get("/api/machines").json() == {"ids": ["lazy"]}


# -- the examples mount it ---------------------------------------------------------------


@pytest.fixture
def repo_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent))


def test_the_flask_example_mounts_the_inspector_at_inspector(
    repo_importable: None, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from examples import conversations
    from examples.flask_app import create_app

    monkeypatch.setenv("INSPECTOR_TOKEN", TOKEN)
    with conversations.make_app(store_url) as machines:
        client = create_app(machines).test_client()
        machines.send("message", "c/1", {"text": "hello", "now": 1.0})
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert client.get("/inspector/api/machines").status_code == 401
        assert client.get("/inspector/api/machines", headers=auth).get_json() == {"ids": ["c/1"]}
        state = client.get("/inspector/api/machines/c%2F1", headers=auth).get_json()["state"]
        assert "hello" in json.dumps(state)
        page = client.get("/inspector/machines/c%2F1", headers=auth)
        assert page.status_code == 200 and 'href="/inspector/static/inspector.css' in page.text


@pytest.mark.filterwarnings("ignore:Using `httpx`")
def test_the_fastapi_example_mounts_the_inspector_at_inspector(
    repo_importable: None, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient

    from examples import conversations
    from examples.fastapi_app import create_api

    monkeypatch.delenv("INSPECTOR_TOKEN", raising=False)
    with TestClient(create_api(lambda: conversations.make_app(store_url))) as client:
        assert client.post("/conversations/c-1/messages", json={"text": "hi"}).status_code == 200
        assert client.get("/inspector/api/machines").json() == {"ids": ["c-1"]}
        page = client.get("/inspector/machines/c-1")
        assert page.status_code == 200 and "c-1" in page.text
        assert client.get("/inspector/failed").status_code == 200


# -- unhappy paths -----------------------------------------------------------------------


def test_an_unavailable_store_is_503(mount: str, make_app: Callable[..., casern.Casern]) -> None:
    def down() -> casern.Casern:
        raise casern.StoreUnavailable("cannot reach the database at http://127.0.0.1:1/db")

    w = Web(mount, make_app())
    if mount == "asgi":
        w.asgi = Starlette(routes=[Mount("/inspector", app=casern.inspector.asgi(down))])
    else:
        w.wsgi = WerkzeugClient(
            DispatcherMiddleware(
                WerkzeugResponse("", 404), {"/inspector": casern.inspector.wsgi(down)}
            )
        )
    api = w.get("/api/machines")
    assert api.status == 503 and "cannot reach" in api.json()["error"]
    page = w.get("/machines/a")
    assert page.status == 503 and "cannot reach" in page.text


def test_a_state_that_cannot_be_upgraded_is_shown_as_stored(
    web: Callable[..., Web], make_app: Callable[..., casern.Casern], store_url: str
) -> None:
    make_app().send("inc", "old")
    newer = make_app(state_version=2)  # and no upgrade function
    w = web(newer)
    info = w.get("/api/machines/old").json()
    assert info["state"] == {"n": 1} and info["version"] == 1
    assert "upgrade" in info["error"]
    page = w.get("/machines/old")
    assert page.status == 200 and "shown as stored" in page.text


def test_with_history_off_the_page_says_so(
    web: Callable[..., Web], make_app: Callable[..., casern.Casern]
) -> None:
    w = web(make_app(history=False))
    w.app.send("inc", "h")
    page = w.get("/machines/h")
    assert page.status == 200 and "history is off" in page.text
    reply = w.get("/api/machines/h/history")
    assert reply.status == 400 and "history is off" in reply.json()["error"]


def test_a_history_that_cannot_be_replayed_shows_no_diff(
    web: Callable[..., Web], make_app: Callable[..., casern.Casern]
) -> None:
    make_app({"inc": inc, "gone": inc}).send("gone", "g")
    w = web(make_app({"inc": inc}))
    w.app.send("inc", "g")
    history = w.get("/api/machines/g/history").json()
    assert [e["diff"] for e in history["history"]] == [None, None]
    assert "no reducer 'gone'" in history["note"]
    assert "what it changed is unknown" in w.get("/machines/g").text


def test_a_replay_that_misses_the_stored_state_is_flagged(
    web: Callable[..., Web], make_app: Callable[..., casern.Casern]
) -> None:
    make_app({"set": lambda p, s, d: {"v": 1}}).send("set", "c")
    w = web(make_app({"set": lambda p, s, d: {"v": 2}}))  # the reducer changed since
    history = w.get("/api/machines/c/history").json()
    assert history["history"][0]["diff"] == [{"path": "v", "op": "add", "new": 2}]
    assert "does not give the stored state" in history["note"]


# -- the pieces: Casern.inspect and the diff ---------------------------------------------


def test_app_inspect_returns_one_machine_or_none(make_app: Callable[..., casern.Casern]) -> None:
    app = make_app()
    assert app.inspect("nobody") is None
    app.send("inc", "x", {"a": 1})
    assert app.inspect("x") == {
        "id": "x",
        "state": {"n": 1, "last": {"a": 1}},
        "seq": 1,
        "version": 1,
        "due": {},
        "pending": [],
        "failed": [],
    }
    with pytest.raises(casern.InvalidId):
        app.inspect("_design/x")


def test_diff_names_each_changed_path() -> None:
    from casern.inspector._diff import diff

    assert diff({}, {}) == []
    assert diff({"a": 1}, {"a": True}) == [{"path": "a", "op": "change", "old": 1, "new": True}]
    assert diff({"l": [1, 2, 3]}, {"l": [1]}) == [
        {"path": "l[1]", "op": "remove", "old": 2},
        {"path": "l[2]", "op": "remove", "old": 3},
    ]
    assert diff({"l": [1, 2]}, {"l": [3, 4, 5]}) == [
        {"path": "l", "op": "change", "old": [1, 2], "new": [3, 4, 5]}
    ]
    assert diff({"l": [{"x": 1}]}, {"l": [{"x": 2}]}) == [
        {"path": "l[0].x", "op": "change", "old": 1, "new": 2}
    ]
    assert diff({}, {"odd key.": {"b": None}}) == [
        {"path": '["odd key."]', "op": "add", "new": {"b": None}}
    ]
    assert diff({"a": {"b": 1}}, {"a": "text"}) == [
        {"path": "a", "op": "change", "old": {"b": 1}, "new": "text"}
    ]


def test_the_timeline_of_a_long_chat_compares_each_change_once(
    make_app: Callable[..., casern.Casern], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A chat that appends each message to its state: the diff of change n looked
    # into all n - 1 earlier messages again, so a machine page of a 1,000-message
    # chat took 13 s (quadratic), and the Live box asked for it every 3 s.
    from casern.inspector import _diff, _timeline

    def message(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
        return {**state, "msgs": [*state.get("msgs", []), data]}

    app = make_app({"message": message})
    n = 200
    for i in range(n):
        app.send("message", "chat", {"i": i, "text": "hello"})
    calls = [0]
    real = _diff.diff

    def counted(*args: Any) -> Any:
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(_diff, "diff", counted)
    monkeypatch.setattr(_timeline, "diff", counted)
    line = _timeline.timeline(app, "chat", app.get("chat"))
    assert line.note is None
    assert [e["diff"] for e in line.entries] == [
        [{"path": "msgs", "op": "add", "new": [{"i": 0, "text": "hello"}]}]
    ] + [
        [{"path": f"msgs[{i}]", "op": "add", "new": {"i": i, "text": "hello"}}] for i in range(1, n)
    ]
    assert calls[0] <= 5 * n  # a few per change, not one per earlier message
