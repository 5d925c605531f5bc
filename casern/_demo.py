"""The chatbot demo: `casern demo` (or `python -m examples.chatbot` in a checkout).

About a thousand simulated users chat with a bot at once. Each conversation is one
state machine on SQLite; the flow is the whole of casern in one place:

    user message → reducer `message` (greeting → answering → closed)
                 → committed with a gap-free seq
                 → listener `reply` answers through a fake chat service
    silence      → timer `idle` nudges ("Are you still there?"), then escalates
                 → listener `handoff` queues the conversation on the `helpdesk` machine

At the end the demo checks every stored state against what the users sent and prints
a summary. It lives inside the package so that it runs from any installation.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import shutil
import sqlite3
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from ._app import Casern
from ._change import Change
from ._types import State

__all__ = ["FakeChat", "Metrics", "command", "make_app", "run"]

DEFAULT_DB = "casern-demo.db"
HELPDESK = "helpdesk"

GREETING = "Hi! I'm the casern bot. What can I do for you?"
NUDGE = "Are you still there?"
HANDOFF = "I've passed your question to a human colleague; they'll be in touch."
GOODBYE = "Glad I could help. Bye!"
FINAL = ("closed", "escalated")

ANSWERS = {
    "order": "Your order is on its way and should arrive within two days.",
    "refund": "Refunds reach your account 3-5 working days after we receive the item.",
    "password": "Use 'Forgot password' on the login page; the link is valid for an hour.",
    "hours": "We are open Monday to Friday, 9:00 to 17:00.",
    "shipping": "Shipping is free from 30 EUR; below that it costs 4.90 EUR.",
}
QUESTIONS = {
    "order": ["Where is my order?", "My order hasn't arrived yet", "order status please"],
    "refund": ["How do I get a refund?", "I want my money back", "refund for a broken mug"],
    "password": ["I forgot my password", "password reset does not work"],
    "hours": ["When are you open?", "What are your opening hours?"],
    "shipping": ["How much is shipping?", "Do you ship to Norway?"],
}
BYES = ["Thanks, bye!", "great, thank you", "bye", "That's all, thanks!"]
HELLOS = ["Hi", "Hello there", "hey", "Good morning", "hi!"]
BACK = ["sorry, I'm back", "still here, sorry", "oops, got distracted"]


# -- the pure part: reducers and timers -------------------------------------------------


def message(preferences: Mapping[str, Any], state: State, data: Any) -> State:
    """A user wrote `data["text"]` at `data["now"]`; move the conversation along."""
    text = str(data["text"])
    state["messages"] = state.get("messages", 0) + 1
    state["last_text"] = text
    state["last_user_at"] = data["now"]
    status = state.get("status")
    if status == "escalated":
        return state  # a human owns it now; the bot keeps quiet
    if status in (None, "closed"):
        state["status"] = "greeting"
    elif any(word in text.lower() for word in ("bye", "thank")):
        state["status"] = "closed"
    else:
        state["status"] = "answering"
        state["questions"] = state.get("questions", 0) + 1
    return state


def idle(preferences: Mapping[str, Any], state: State, data: Any) -> State:
    """The idle timer fired at `data["now"]`: nudge a silent user, then escalate."""
    now = float(data["now"])
    wait = float(preferences["idle"])
    status = state.get("status")
    if status in ("greeting", "answering") and now >= state["last_user_at"] + wait:
        state["status"] = "nudged"
        state["nudged_at"] = now
        state["nudges"] = state.get("nudges", 0) + 1
    elif status == "nudged" and now >= state["nudged_at"] + wait:
        state["status"] = "escalated"
    return state


def idle_due(preferences: Mapping[str, Any], state: State) -> float | None:
    """When the `idle` timer should look at this conversation again (None: never)."""
    wait = float(preferences["idle"])
    status = state.get("status")
    if status in ("greeting", "answering"):
        return float(state["last_user_at"]) + wait
    if status == "nudged":
        return float(state["nudged_at"]) + wait
    return None


def enqueue(preferences: Mapping[str, Any], state: State, data: Any) -> State:
    """The helpdesk machine: how many conversations were escalated, and the latest few.

    A state is one document, rewritten (and copied into the outbox) on every change,
    so it stays small: the whole queue is a query, `find({"status": "escalated"})`,
    not a list that grows with every escalation. (`change.send`'s derived key makes
    a redelivered handoff count once.)
    """
    latest = [c for c in state.get("latest", []) if c != data["conversation"]]
    state["latest"] = [*latest, data["conversation"]][-10:]
    state["count"] = state.get("count", 0) + 1
    return state


MESSAGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "text": {"type": "string", "minLength": 1},
        "now": {"type": "number"},
    },
    "required": ["text", "now"],
}


# -- the effects: services and listeners ------------------------------------------------


class FakeChat:
    """The chat service the bot talks through: counts replies, drops repeats by (id, seq).

    When `attach`ed to the simulation's event loop it also delivers each reply to
    the user's inbox, so the simulated users read what the bot says.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: set[tuple[str, int]] = set()
        self.sent = 0
        self.duplicates = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inboxes: dict[str, asyncio.Queue[str]] = {}

    def attach(self, loop: asyncio.AbstractEventLoop, conversations: list[str]) -> None:
        self._inboxes = {c: asyncio.Queue() for c in conversations}
        self._loop = loop

    def inbox(self, conversation: str) -> asyncio.Queue[str]:
        return self._inboxes[conversation]

    async def post(self, conversation: str, text: str, *, dedupe: tuple[str, int]) -> None:
        await asyncio.sleep(0.001)  # a network round trip, roughly
        with self._lock:
            if dedupe in self._seen:
                self.duplicates += 1
                return
            self._seen.add(dedupe)
            self.sent += 1
        inbox = self._inboxes.get(conversation)
        if self._loop is not None and inbox is not None:
            self._loop.call_soon_threadsafe(inbox.put_nowait, text)


@dataclass
class Metrics:
    """What the listeners saw, each change counted once however often it was delivered."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    deliveries: set[tuple[str, str, int]] = field(default_factory=set)
    commits: dict[tuple[str, int], str] = field(default_factory=dict)
    finished: set[str] = field(default_factory=set)
    nudges: int = 0
    escalations: int = 0

    def record(self, change: Change) -> None:
        with self.lock:
            self.deliveries.add((change.listener, change.id, change.seq))
            if change.listener != "metrics" or (change.id, change.seq) in self.commits:
                return
            self.commits[(change.id, change.seq)] = change.reducer
            status, before = change.state.get("status"), change.prev.get("status")
            if change.reducer == "idle":
                self.nudges += status == "nudged"
                self.escalations += status == "escalated"
            if status in FINAL and before not in FINAL:
                self.finished.add(change.id)


async def reply(change: Change) -> None:
    """Answer every user message, nudge and escalation through the chat service."""
    change.services["metrics"].record(change)
    status = change.state.get("status")
    text: str | None = None
    if change.reducer == "message":
        if status == "greeting":
            text = GREETING
        elif status == "closed":
            text = GOODBYE
        elif status == "answering":
            asked = str(change.data["text"]).lower()
            topic = next((t for t in ANSWERS if t in asked or _mentions(asked, t)), None)
            text = ANSWERS[topic] if topic else "Let me look into that for you."
    elif change.reducer == "idle" and status != change.prev.get("status"):
        text = NUDGE if status == "nudged" else HANDOFF if status == "escalated" else None
    if text is not None:
        await change.services["chat"].post(change.id, text, dedupe=(change.id, change.seq))


def _mentions(text: str, topic: str) -> bool:
    return any(q.lower() == text for q in QUESTIONS[topic])


async def handoff(change: Change) -> None:
    """A conversation just escalated: put it on the helpdesk's queue (a further action)."""
    change.services["metrics"].record(change)
    if change.state.get("status") == "escalated" and change.prev.get("status") != "escalated":
        change.send("enqueue", HELPDESK, {"conversation": change.id})


async def metrics(change: Change) -> None:
    """Count commits, nudges and escalations for the summary."""
    change.services["metrics"].record(change)


def make_app(
    store: str = f"sqlite:///{DEFAULT_DB}",
    *,
    idle_after: float = 1.5,
    chat: FakeChat | None = None,
    stats: Metrics | None = None,
    tick: float = 0.2,
) -> Casern:
    """The demo's app; `casern --app casern._demo:make_app ls` explores the demo database."""
    return Casern(
        store,
        {"idle": idle_after},
        {"chat": chat or FakeChat(), "metrics": stats or Metrics()},
        {"message": message, "idle": idle, "enqueue": enqueue},
        {"reply": reply, "handoff": handoff, "metrics": metrics},
        schemas={"message": MESSAGE_SCHEMA},
        timers={"idle": idle_due},
        tick=tick,
    )


# -- the simulation ---------------------------------------------------------------------


@dataclass
class Script:
    """What one simulated user will do: `kind` is closes, returns or leaves."""

    id: str
    kind: str
    first: list[str]
    after_nudge: list[str]


def scripts(n: int, seed: int) -> list[Script]:
    """Deterministic conversations: 60% close, 25% come back after a nudge, 15% leave."""
    rng = random.Random(seed)
    width = max(4, len(str(n)))
    out = []
    for i in range(1, n + 1):
        questions = [rng.choice(rng.choice(list(QUESTIONS.values()))) for _ in range(3)]
        first = [rng.choice(HELLOS), *questions[: rng.randint(1, 3)]]
        roll = rng.random()
        if roll < 0.60:
            kind, first, after = "closes", [*first, rng.choice(BYES)], []
        elif roll < 0.85:
            kind, after = "returns", [rng.choice(BACK), questions[0], rng.choice(BYES)]
        else:
            kind, after = "leaves", []
        out.append(Script(f"chat-{i:0{width}d}", kind, first, after))
    return out


@dataclass
class Sent:
    """What the users actually sent, per conversation: the truth the check compares with."""

    counts: dict[str, int] = field(default_factory=dict)
    last: dict[str, str] = field(default_factory=dict)
    total: int = 0
    quiet: int = 0  # users through their first messages (closed, left or gone quiet)
    first_wave_done: float = 0.0
    first_wave_messages: int = 0


async def _converse(
    app: Casern,
    chat: FakeChat,
    script: Script,
    sent: Sent,
    slots: asyncio.Semaphore,
    wait: float,
    rng: random.Random,
) -> None:
    inbox = chat.inbox(script.id)

    async def say(text: str) -> None:
        await asyncio.sleep(rng.uniform(0, 0.005))  # the user types
        await app.asend("message", script.id, {"text": text, "now": time.time()})
        sent.counts[script.id] = sent.counts.get(script.id, 0) + 1
        sent.last[script.id] = text
        sent.total += 1
        # The bot's answer; a nudge that crossed the user's message is not one.
        while await asyncio.wait_for(inbox.get(), wait) == NUDGE:
            pass

    async with slots:
        for text in script.first:
            await say(text)
    sent.quiet += 1
    if script.kind == "returns":
        while await asyncio.wait_for(inbox.get(), wait) != NUDGE:
            pass
        for text in script.after_nudge:  # at once, without queueing for a slot
            await say(text)


async def _simulate(
    app: Casern,
    chat: FakeChat,
    stats: Metrics,
    plan: list[Script],
    idle_after: float,
    concurrency: int,
) -> tuple[Sent, list[str]]:
    """Let every user chat; show how many conversations are finished meanwhile."""
    chat.attach(asyncio.get_running_loop(), [s.id for s in plan])
    sent = Sent()
    # At most `concurrency` users type at once, so that an answer comes back well
    # within the idle time even on a busy machine (Little's law: latency = users / rate).
    slots = asyncio.Semaphore(concurrency)
    wait = idle_after * 3 + 30  # no answer for this long: something is broken
    rng = random.Random(len(plan))
    started = time.monotonic()
    tasks = [
        asyncio.ensure_future(_converse(app, chat, script, sent, slots, wait, rng))
        for script in plan
    ]
    live = sys.stdout.isatty()
    with click.progressbar(
        length=len(plan), label="  chatting  ", show_pos=True, width=30, hidden=not live
    ) as bar:
        shown = 0
        quarter = 0  # without a terminal, a line at every quarter instead of a bar
        while True:
            done = len(stats.finished)
            bar.update(done - shown)
            shown = done
            if not live and done * 4 >= (quarter + 1) * len(plan):
                quarter = done * 4 // len(plan)
                click.echo(f"  chatting    {done:,}/{len(plan):,} conversations finished")
            if not sent.first_wave_done and sent.quiet >= len(plan):
                sent.first_wave_done = time.monotonic() - started
                sent.first_wave_messages = sent.total
            if done >= len(plan) and all(t.done() for t in tasks):
                break
            if all(t.done() for t in tasks) and time.monotonic() - started > wait * 2:
                break  # some conversation never finished; the check reports it
            await asyncio.sleep(0.05)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    errors = [
        f"{script.id}: user gave up: {type(r).__name__} {r}"
        for script, r in zip(plan, results, strict=True)
        if isinstance(r, BaseException)
    ]
    return sent, errors


def _prepare(path: Path, explicit: bool) -> None:
    """Remove the previous demo database; never a file that is not a casern database."""
    if not path.exists():
        return
    if explicit:
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
                tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
        except sqlite3.Error:
            tables = set()
        if "machines" not in tables:
            raise click.ClickException(
                f"{path} exists and is not a casern database; choose another --db"
            )
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _n(value: float) -> str:
    return f"{value:,.0f}"


def run(
    conversations: int = 1000,
    db: str | None = None,
    idle_after: float = 1.5,
    seed: int = 7,
    concurrency: int = 100,
) -> int:
    """Run the demo; returns 0 if every stored state matches what was sent, else 1."""
    wall = time.monotonic()
    path = Path(db or DEFAULT_DB).absolute()
    _prepare(path, explicit=db is not None)
    chat, stats = FakeChat(), Metrics()
    plan = scripts(conversations, seed)
    kinds = {k: sum(s.kind == k for s in plan) for k in ("closes", "returns", "leaves")}
    echo = click.echo
    echo(f"casern demo: {conversations:,} chatbot conversations, one state machine each")
    echo(f"  database    {path} (recreated on every run)")
    echo(
        f"  users       {kinds['closes']:,} ask and say bye, {kinds['returns']:,} go quiet"
        f" and come back when nudged,\n              {kinds['leaves']:,} leave;"
        f" up to {concurrency} type at the same time"
    )
    echo(
        f"  idle timer  nudges after {idle_after:g} s of silence, escalates {idle_after:g} s later"
    )
    with make_app(f"sqlite:///{path}", idle_after=idle_after, chat=chat, stats=stats) as app:
        app.start()
        sent, problems = asyncio.run(_simulate(app, chat, stats, plan, idle_after, concurrency))
        app.stop()
        app.drain(30)
        statuses, history = _check(app, plan, sent, chat, stats, problems)
    elapsed = time.monotonic() - wall
    first = sent.first_wave_done or elapsed
    first_msgs = sent.first_wave_messages or sent.total
    timer_commits = sum(r == "idle" for r in stats.commits.values())
    rows = [
        (
            "conversations",
            _n(conversations),
            f"{statuses.get('closed', 0):,} closed, {statuses.get('escalated', 0):,}"
            " escalated to the helpdesk",
        ),
        ("user messages", _n(sent.total), "each answered by the bot from a listener"),
        ("commits", _n(history), "state changes in the history, a gap-free seq per id"),
        (
            "listener deliveries",
            _n(len(stats.deliveries)),
            f"{len(app.listeners)} listeners (reply, handoff, metrics) x {len(stats.commits):,}"
            " changes",
        ),
        ("bot replies", _n(chat.sent), f"{chat.duplicates} repeats dropped by (id, seq)"),
        (
            "timers fired",
            _n(timer_commits),
            f"{stats.nudges:,} nudges, {stats.escalations:,} escalations",
        ),
        (
            "throughput",
            f"{first_msgs / first:,.0f} msgs/s",
            f"{first_msgs:,} messages sent and answered in {first:.2f} s",
        ),
        ("wall time", f"{elapsed:.1f} s", "including the idle waits for the timers"),
    ]
    echo("")
    for name, value, note in rows:
        echo(f"  {name:<20}{value:>14}   {note}")
    echo("")
    if problems:
        for p in problems[:20]:
            echo(f"  mismatch: {p}", err=True)
        echo(f"casern demo: check failed with {len(problems)} problem(s)", err=True)
        return 1
    echo("  check: OK, every stored state matches what its user sent")
    echo("")
    store = "" if path == Path(DEFAULT_DB).absolute() else f" --store sqlite:///{path}"
    # The command as this shell can run it: `.venv/bin/casern` when not on PATH.
    script = sys.argv[0] if os.path.basename(sys.argv[0]) == "casern" else "casern"
    if script != "casern" and shutil.which("casern") == os.path.abspath(script):
        script = "casern"
    echo("Explore the database:")
    echo(f"  {script} --app casern._demo:make_app{store} ls --limit 5")
    echo(f"  {script} --app casern._demo:make_app{store} history {plan[0].id}")
    return 0


def _check(
    app: Casern,
    plan: list[Script],
    sent: Sent,
    chat: FakeChat,
    stats: Metrics,
    problems: list[str],
) -> tuple[dict[str, int], int]:
    """Compare every stored state with what its user sent; append what differs to `problems`.

    Returns how many conversations end in each status and how many commits history holds.
    """
    statuses: dict[str, int] = {}
    commits = 0
    for script in plan:
        state = app.get(script.id) or {}
        status = state.get("status")
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        want = "escalated" if script.kind == "leaves" else "closed"
        count = sent.counts.get(script.id, 0)
        if status != want:
            problems.append(f"{script.id}: status {status!r}, expected {want!r}")
        if state.get("messages") != count:
            problems.append(f"{script.id}: {state.get('messages')} messages stored, {count} sent")
        if state.get("last_text") != sent.last.get(script.id):
            problems.append(f"{script.id}: last text {state.get('last_text')!r} was not sent last")
        seqs = [e["seq"] for e in app.history(script.id)]
        if seqs != list(range(1, len(seqs) + 1)):
            problems.append(f"{script.id}: history seqs {seqs} have gaps")
        commits += len(seqs)
    helpdesk = app.get(HELPDESK) or {}
    commits += len(app.history(HELPDESK))
    if helpdesk.get("count", 0) != stats.escalations:
        problems.append(
            f"helpdesk queues {helpdesk.get('count', 0)}, {stats.escalations} escalated"
        )
    if commits != len(stats.commits):
        problems.append(f"{commits} commits in history, {len(stats.commits)} seen by listeners")
    if chat.sent != sent.total + stats.nudges + stats.escalations:
        problems.append(
            f"{chat.sent} bot replies for {sent.total} messages, {stats.nudges} nudges"
            f" and {stats.escalations} escalations"
        )
    return statuses, commits


@click.command(name="demo")
@click.option(
    "-n",
    "--conversations",
    type=click.IntRange(1, 1_000_000),
    default=1000,
    show_default=True,
    metavar="N",
    help="How many simulated conversations.",
)
@click.option(
    "--users",
    "concurrency",
    type=click.IntRange(1, 10_000),
    default=100,
    show_default=True,
    metavar="N",
    help="How many users type at the same time.",
)
@click.option(
    "--idle",
    "idle_after",
    type=click.FloatRange(0.1, 60),
    default=1.5,
    show_default=True,
    metavar="SECONDS",
    help="Seconds of silence before the bot nudges, and again before it escalates.",
)
@click.option(
    "--db",
    type=click.Path(dir_okay=False),
    default=None,
    help=f"SQLite file to use, recreated on every run.  [default: ./{DEFAULT_DB}]",
)
@click.option(
    "--seed",
    type=int,
    default=7,
    show_default=True,
    metavar="N",
    help="Seed of the simulated users.",
)
def command(
    conversations: int, concurrency: int, idle_after: float, db: str | None, seed: int
) -> None:
    """Run the chatbot demo: many conversations, listeners, timers and a summary.

    Each conversation is a small state machine stored in SQLite. Simulated
    users send messages concurrently; a listener answers each one through a
    fake chat service; an idle timer nudges users who go quiet and escalates
    those who never come back. At the end every stored state is checked
    against what the users sent (exit status 1 if anything differs).
    """
    parent = click.get_current_context().parent
    if parent is not None and parent.get_parameter_source("store") is ParameterSource.COMMANDLINE:
        raise click.UsageError("the demo makes its own SQLite database: use --db PATH, not --store")
    # A tick that overruns (a busy machine) is skipped and retried: not worth a warning.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    code = run(conversations, db, idle_after, seed, concurrency)
    if code:
        raise SystemExit(code)
