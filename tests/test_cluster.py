"""The contract on a 3-node Apache CouchDB cluster (n=3), where documents can fork.

Two apps stand for two processes: each has its own committer and revision
cache, and each talks to a different node. Bounded in sends and time.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from _apache import ENV_CLUSTER, ApacheCouch, NoApache, require_apache

import casern
from _couch import fresh_db_name
from conftest import inc

pytestmark = [pytest.mark.couchdb, pytest.mark.cluster, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def cluster() -> Iterator[ApacheCouch]:
    given = os.environ.get(ENV_CLUSTER)
    if given:
        yield ApacheCouch.attach(given)
        return
    try:
        couch = ApacheCouch(nodes=3)
    except NoApache as e:
        if require_apache():
            raise
        pytest.skip(f"no Apache CouchDB cluster to test against: {e}")
    with couch:
        yield couch


def _raw(url: str) -> Any:
    """GET with the admin credentials in `url` (urllib does not take them from the URL)."""
    parts = urlsplit(url)
    auth = base64.b64encode(f"{parts.username}:{parts.password}".encode()).decode()
    bare = urlunsplit((parts.scheme, f"{parts.hostname}:{parts.port}", parts.path, parts.query, ""))
    req = urllib.request.Request(bare, headers={"Authorization": f"Basic {auth}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)


def _leaves(url: str, id: str) -> int:
    """How many live leaf revisions `id` has, from every replica that answers."""
    parts = urlsplit(f"{url}/{id}?open_revs=all")
    auth = base64.b64encode(f"{parts.username}:{parts.password}".encode()).decode()
    bare = urlunsplit((parts.scheme, f"{parts.hostname}:{parts.port}", parts.path, parts.query, ""))
    req = urllib.request.Request(
        bare, headers={"Authorization": f"Basic {auth}", "Accept": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return sum(1 for r in json.load(resp) if "ok" in r and not r["ok"].get("_deleted"))


class Seen:
    """A listener that records every delivery, as a service keyed on (id, seq) would."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.changes: list[tuple[str, int, int, int]] = []  # id, seq, prev n, new n

    def __call__(self, change: casern.Change) -> None:
        with self.lock:
            self.changes.append(
                (change.id, change.seq, change.prev.get("n", 0), change.state.get("n", 0))
            )


def _apps(cluster: ApacheCouch, db: str, seen: Seen, nodes: list[int]) -> list[casern.Casern]:
    urls = cluster.urls()
    return [casern.Casern(f"{urls[i]}/{db}", {}, {}, {"inc": inc}, {"seen": seen}) for i in nodes]


def _run_all(workers: list[threading.Thread]) -> None:
    for t in workers:
        t.start()
    for t in workers:
        t.join()


def _settle(
    cluster: ApacheCouch, db: str, ids: list[str], seen: Seen, reducers: Any = None
) -> None:
    """Run worker ticks until no id has a sibling or an undelivered change (bounded).

    A write the cluster refused may still have landed on one replica: that sibling
    surfaces after the last write, and a worker's tick merges it. A change whose
    fast-path delivery was given up on (its branch was merged away and back) is
    still in the outbox, and the tick delivers it, as after a crash.
    """
    url = f"{cluster.url}/{db}"
    reducers = reducers or {"inc": inc}
    with casern.Casern(url, {}, {}, reducers, {"seen": seen}, redeliver_after=0.2) as app:
        for _ in range(100):
            docs = [_raw(f"{url}/{id}?conflicts=true") for id in ids]
            forks = [_leaves(url, id) for id in ids]
            if not any(d.get("pending") for d in docs) and all(n == 1 for n in forks):
                return
            time.sleep(0.2)
            app.run_once()
            assert app.drain(60)
        pytest.fail(f"forks or undelivered changes left: {docs}")


def _check_one_counter(
    cluster: ApacheCouch, db: str, id: str, sent: int, seen: Seen, reducers: Any = None
) -> None:
    """Exact count, gapless seq, history = state, no fork left, one change per (id, seq)."""
    _settle(cluster, db, [id], seen, reducers)
    with casern.Casern(f"{cluster.url}/{db}", {}, {}, reducers or {"inc": inc}, {}) as app:
        assert app.get(id) == {"n": sent}
        history = app.history(id)
        assert [e["seq"] for e in history] == list(range(1, sent + 1))
        assert app.replay(id) == {"n": sent}
    doc = _raw(f"{cluster.url}/{db}/{id}?conflicts=true")
    assert doc["seq"] == sent
    assert "_conflicts" not in doc and _leaves(f"{cluster.url}/{db}", id) == 1
    by_seq: dict[int, set[tuple[int, int]]] = {}
    for cid, seq, prev, new in seen.changes:
        assert cid == id
        by_seq.setdefault(seq, set()).add((prev, new))
    assert sorted(by_seq) == list(range(1, sent + 1)), "every change reaches a listener"
    for seq, contents in by_seq.items():
        assert contents == {(seq - 1, seq)}, f"(id, seq={seq}) names one change"


def test_two_processes_on_two_nodes_lose_no_update_on_one_id(cluster: ApacheCouch) -> None:
    db, seen = fresh_db_name(), Seen()
    apps = _apps(cluster, db, seen, [0, 1])
    threads, sends = 2, 30

    def writer(app: casern.Casern) -> None:
        for _ in range(sends):
            app.send("inc", "counter")

    _run_all([threading.Thread(target=writer, args=(a,)) for a in apps for _ in range(threads)])
    for app in apps:
        assert app.drain(60)
    _check_one_counter(cluster, db, "counter", len(apps) * threads * sends, seen)
    for app in apps:
        app.close()


def count(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
    return {"n": state.get("n", 0) + 1}


def test_sends_with_big_data_on_two_nodes_lose_no_update(cluster: ApacheCouch) -> None:
    """The journal keeps only the newest 64 KiB of data whole: forks still merge exactly."""
    db, seen = fresh_db_name(), Seen()
    urls = cluster.urls()
    apps = [
        casern.Casern(f"{urls[i]}/{db}", {}, {}, {"inc": count}, {"seen": seen}) for i in (0, 1)
    ]
    blob = "x" * 30_000  # two actions' data fill the journal's budget
    threads, sends = 2, 15

    def writer(app: casern.Casern) -> None:
        for i in range(sends):
            app.send("inc", "counter", {"i": i, "blob": blob})

    _run_all([threading.Thread(target=writer, args=(a,)) for a in apps for _ in range(threads)])
    for app in apps:
        assert app.drain(60)
    sent = len(apps) * threads * sends
    _check_one_counter(cluster, db, "counter", sent, seen, {"inc": count})
    doc = _raw(f"{cluster.url}/{db}/counter")
    assert len(json.dumps(doc)) < 300_000, "the envelope stays small"
    for app in apps:
        app.close()


def test_concurrent_creation_of_the_same_new_ids_loses_nothing(cluster: ApacheCouch) -> None:
    db, seen = fresh_db_name(), Seen()
    apps = _apps(cluster, db, seen, [0, 1, 2])
    ids = [f"new-{i}" for i in range(8)]

    def writer(app: casern.Casern) -> None:
        for id in ids:
            app.send("inc", id)

    _run_all([threading.Thread(target=writer, args=(a,)) for a in apps])
    for app in apps:
        assert app.drain(60)
    _settle(cluster, db, ids, seen)
    with casern.Casern(f"{cluster.url}/{db}", {}, {}, {"inc": inc}, {}) as app:
        assert {id: app.get(id) for id in ids} == {id: {"n": 3} for id in ids}
    for id in ids:
        assert _leaves(f"{cluster.url}/{db}", id) == 1, "no fork left"
    assert {(c[0], c[1]) for c in seen.changes} == {(id, seq) for id in ids for seq in (1, 2, 3)}
    assert all((prev, new) == (seq - 1, seq) for _, seq, prev, new in seen.changes)
    for app in apps:
        app.close()


def _post(url: str, path: str, body: Any) -> Any:
    parts = urlsplit(url)
    auth = base64.b64encode(f"{parts.username}:{parts.password}".encode()).decode()
    req = urllib.request.Request(
        f"http://{parts.hostname}:{parts.port}{path}",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Basic {auth}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)


def _inject_sibling(cluster: ApacheCouch, db: str, id: str, parent: Any, *, key: str) -> None:
    """A second child of `parent` holding one more `inc`, written as replication would
    (`new_edits=false`): a branch made by a process on a partitioned node."""
    gen, parent_hash = parent["_rev"].split("-")
    sibling = {
        **{k: v for k, v in parent.items() if not k.startswith("_") and k != "casern_w"},
        "_id": id,
        "_rev": f"{int(gen) + 1}-{'f' * 32}",
        "_revisions": {"start": int(gen) + 1, "ids": ["f" * 32, parent_hash]},
        "state": {"n": parent["state"]["n"] + 1},
        "seq": parent["seq"] + 1,
        "keys": [key],
        "ops": [
            *parent["ops"],
            {"u": key, "seq": parent["seq"] + 1, "reducer": "inc", "data": None, "key": key},
        ],
    }
    for field in ("pending", "pending_since", "log"):
        sibling.pop(field, None)
    _post(cluster.url, f"/{db}/_bulk_docs", {"docs": [sibling], "new_edits": False})
    for _ in range(100):  # replicas apply a replicated revision asynchronously
        if _raw(f"{cluster.url}/{db}/{id}?conflicts=true").get("_conflicts"):
            return
        time.sleep(0.1)
    pytest.fail("the injected sibling never showed up as a conflict")


def test_a_fork_made_elsewhere_is_merged_by_the_next_send(cluster: ApacheCouch) -> None:
    """A sibling injected by hand (`new_edits=false`, as replication does) keeps its change."""
    db, seen = fresh_db_name(), Seen()
    first, other = _apps(cluster, db, seen, [0, 1])
    first.send("inc", "m")
    parent = _raw(f"{cluster.url}/{db}/m")
    first.send("inc", "m")
    assert first.drain(30)
    _inject_sibling(cluster, db, "m", parent, key="elsewhere")
    # `other` has never written "m": it reads, sees the fork and merges it.
    assert other.send("inc", "m") == {"n": 4}
    assert other.send("inc", "m", key="elsewhere") == {"n": 4}, "the replayed key counts"
    for app in (first, other):
        assert app.drain(30)
    doc = _raw(f"{cluster.url}/{db}/m?conflicts=true")
    assert "_conflicts" not in doc and doc["seq"] == 4 and doc["state"] == {"n": 4}
    assert [e["seq"] for e in other.history("m")] == [1, 2, 3, 4]
    assert {c[1] for c in seen.changes} == {1, 2, 3, 4}
    for app in (first, other):
        app.close()


def test_a_worker_tick_merges_forks_nobody_writes(cluster: ApacheCouch) -> None:
    db, seen = fresh_db_name(), Seen()
    (app,) = _apps(cluster, db, seen, [0])
    for id in ("quiet-1", "quiet-2", "untouched"):
        app.send("inc", id)
    assert app.drain(30)
    for id in ("quiet-1", "quiet-2"):
        # Fork from the revision before the current one (the acknowledgement's parent).
        revs = _raw(f"{cluster.url}/{db}/{id}?revs=true")["_revisions"]
        before = f"{revs['start'] - 1}-{revs['ids'][1]}"
        parent = _raw(f"{cluster.url}/{db}/{id}?rev={before}")
        _inject_sibling(cluster, db, id, parent, key=f"elsewhere-{id}")
    assert sorted(app.store.forked(10)) == ["quiet-1", "quiet-2"]
    app.run_once()
    assert app.drain(30)
    for id in ("quiet-1", "quiet-2"):
        doc = _raw(f"{cluster.url}/{db}/{id}?conflicts=true")
        assert "_conflicts" not in doc and doc["state"] == {"n": 2} and doc["seq"] == 2
    assert app.store.forked(10) == []
    assert app.get("untouched") == {"n": 1}
    app.close()


def test_a_node_killed_mid_traffic_loses_nothing(cluster: ApacheCouch) -> None:
    """SIGKILL node 3 while two apps write through nodes 1 and 2; bring it back."""
    db, seen = fresh_db_name(), Seen()
    apps = _apps(cluster, db, seen, [0, 1])
    ids = ["k-0", "k-1", "k-2"]
    sends, done = 20, [0, 0]
    killed, restarted = threading.Event(), threading.Event()

    def writer(n: int, app: casern.Casern) -> None:
        for i in range(sends):
            if n == 0 and i == sends // 3:
                cluster.kill(3)
                killed.set()
            if n == 0 and i == 2 * sends // 3:
                cluster.start_node(3)
                restarted.set()
            for id in ids:
                app.send("inc", id)
            done[n] += 1

    try:
        _run_all([threading.Thread(target=writer, args=(n, a)) for n, a in enumerate(apps)])
    finally:
        if killed.is_set() and not restarted.is_set():
            cluster.start_node(3)
    assert done == [sends, sends]
    for app in apps:
        assert app.drain(120)
        app.close()
    _settle(cluster, db, ids, seen)
    with casern.Casern(f"{cluster.url}/{db}", {}, {}, {"inc": inc}, {}) as app:
        for id in ids:
            assert app.get(id) == {"n": 2 * sends}
            assert [e["seq"] for e in app.history(id)] == list(range(1, 2 * sends + 1))
    for id in ids:
        assert _leaves(f"{cluster.url}/{db}", id) == 1, "no fork left"
    by_key: dict[tuple[str, int], set[tuple[int, int]]] = {}
    for id, seq, prev, new in seen.changes:
        by_key.setdefault((id, seq), set()).add((prev, new))
    assert sorted(by_key) == sorted((id, s) for id in ids for s in range(1, 2 * sends + 1))
    assert all(v == {(seq - 1, seq)} for (_, seq), v in by_key.items())
