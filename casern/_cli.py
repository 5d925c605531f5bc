"""The `casern` command line: inspect and drive an app's machines from a shell.

The app is named like a WSGI app, `--app module:attribute` (or `CASERN_APP`):
the attribute is a `casern.Casern` or a zero-argument factory returning one.
Every error ends the command with one line on stderr (`casern: error: ...`)
and a non-zero exit status: 1 when casern or the store refused, 2 for a usage
mistake. `--debug` adds the traceback.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import IO, Any, Concatenate, NoReturn, ParamSpec, TypeVar

import click

from . import __version__
from ._app import Casern
from ._demo import command as demo_command
from ._errors import CasernError
from .stores import StoreURLError
from .stores.base import STORE_URLS

__all__ = ["cli", "main"]

log = logging.getLogger("casern")

P = ParamSpec("P")
R = TypeVar("R")

APP_HELP = (
    "--app names your app as MODULE:ATTRIBUTE, e.g. --app myproject.machines:app, where "
    "ATTRIBUTE is a casern.Casern or a function that returns one"
)


class CLIError(click.ClickException):
    """A failure reported as one line on stderr: `casern: error: <message>`."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"casern: error: {self.format_message()}", file=file, err=file is None)


class CLIUsageError(CLIError):
    """A usage mistake (a missing argument, a bad --app ...): exit status 2."""

    exit_code = 2


# `casern` alone prints the help (click >= 8.2 raises it as a usage error): keep it whole.
_HELP: tuple[type[click.UsageError], ...] = tuple(
    t for t in [getattr(click.exceptions, "NoArgsIsHelpError", None)] if t is not None
)


def _one_line(e: click.UsageError) -> CLIError:
    """A click usage error, without the usage block: one line and a pointer to --help."""
    where = e.ctx.command_path if e.ctx is not None else "casern"
    return CLIUsageError(f"{e.format_message()} (see '{where} --help')")


class _Group(click.Group):
    """A group whose every failure is one line, with the traceback only under --debug."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except _HELP:
            raise
        except click.UsageError as e:
            raise _one_line(e) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CLIError:
            raise
        except _HELP:
            raise
        except click.UsageError as e:  # a subcommand's arguments
            raise _one_line(e) from None
        except click.ClickException as e:
            cls = CLIUsageError if e.exit_code == 2 else CLIError
            raise cls(e.format_message()) from None
        except (click.exceptions.Exit, click.Abort):  # --help, ctx.exit(), Ctrl-C
            raise
        except Exception as e:
            options = ctx.find_object(Options)
            if options is not None and options.debug:
                traceback.print_exc(file=sys.stderr)
            raise _failure(e, options) from None


def _failure(e: Exception, options: Options | None) -> CLIError:
    if isinstance(e, StoreURLError):
        shown = any(form in str(e) for form in ("sqlite:///", "user:pass@host"))
        hint = "" if shown else f"; a store URL is {STORE_URLS}"
        if options is not None and options.store is not None:
            return CLIUsageError(f"bad --store: {e}{hint}")
        where = f" of --app {options.app}" if options is not None and options.app else ""
        return CLIError(f"bad store URL{where}: {e}{hint}")
    if isinstance(e, CasernError | ValueError):
        return CLIError(str(e) or type(e).__name__)
    hint = "" if options is not None and options.debug else " (run with --debug for the traceback)"
    return CLIError(f"{type(e).__name__}: {e}{hint}")


@dataclass
class Options:
    """The global options, handed to every subcommand."""

    app: str | None
    store: str | None
    debug: bool
    verbose: int

    @contextmanager
    def open(self) -> Iterator[Casern]:
        """The app named by --app (on --store, if given), closed when the command ends."""
        app = load_app(self.app, self.store)
        try:
            yield app
        except KeyboardInterrupt:
            app.close(timeout=0.5)  # Ctrl-C: listeners still running are left to a worker
            raise
        finally:
            app.close()


def with_app(
    fn: Callable[Concatenate[Casern, P], R],
) -> Callable[P, R]:
    """Decorate a subcommand to receive the loaded app as its first argument."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        options = click.get_current_context().find_object(Options)
        assert options is not None
        with options.open() as app:
            return fn(app, *args, **kwargs)

    return wrapper


# -- loading the app --------------------------------------------------------------------


def load_app(ref: str | None, store: str | None = None) -> Casern:
    """Import `module:attribute` and return the app it names (rebuilt on `store` if given)."""
    if not ref:
        raise CLIUsageError(f"no app given. {APP_HELP} (or set CASERN_APP)")
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise CLIUsageError(f"--app {ref!r} is not MODULE:ATTRIBUTE. {APP_HELP}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: the current directory first
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise CLIUsageError(
                f"cannot import {module_name!r} named by --app: {e}. Run casern from the"
                " directory that holds it, or add that directory to PYTHONPATH"
            ) from e
        raise  # the module itself failed to import something: a bug to show as such
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise CLIUsageError(
                f"module {module_name!r} has no attribute {attr!r}. {APP_HELP}"
            ) from None
    if isinstance(target, Casern):
        app = target
    elif not callable(target):
        kind = type(target).__name__
        raise CLIUsageError(f"--app {ref!r} is a {kind} value, not an app. {APP_HELP}")
    elif store is not None and _accepts_store(target):
        return _checked(_call_factory(target, ref, store=store), ref)
    else:
        app = _checked(_call_factory(target, ref), ref)
    if store is None:
        return app
    try:
        return app.with_store(store)  # the same reducers, listeners and options
    finally:
        app.close()


def _call_factory(factory: Callable[..., Any], ref: str, **kwargs: Any) -> Any:
    try:
        return factory(**kwargs)
    except (CasernError, CLIError, StoreURLError):
        raise
    except Exception as e:
        raise CLIError(f"the app factory --app {ref} raised {type(e).__name__}: {e}") from e


def _checked(app: Any, ref: str) -> Casern:
    if not isinstance(app, Casern):
        app_type = type(app).__name__
        raise CLIUsageError(f"--app {ref!r} returned a {app_type}, not a casern.Casern. {APP_HELP}")
    return app


def _accepts_store(factory: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        (p.name == "store" and p.kind != p.POSITIONAL_ONLY) or p.kind == p.VAR_KEYWORD
        for p in params
    )


# -- output -----------------------------------------------------------------------------


def echo_json(value: Any) -> None:
    """JSON on stdout: indented for a person at a terminal, one compact line for a pipe."""
    if sys.stdout.isatty():
        text = json.dumps(value, indent=2, ensure_ascii=False)
    else:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    click.echo(text)


def parse_json(
    text: str | None, param_hint: str = "JSON", example: str = """'{"qty": 2}' or '"text"'"""
) -> Any:
    """A JSON argument (None if absent, stdin for `-`), or a usage error."""
    if text is None:
        return None
    if text == "-":
        text = sys.stdin.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise click.BadParameter(
            f"{text!r:.60} is not valid JSON ({e.msg} at column {e.colno}); put JSON in"
            f" single quotes, e.g. {example}",
            param_hint=param_hint,
        ) from None


class _Handler(logging.Handler):
    """Log records as lines on whatever stderr is right now (click's test runner swaps it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            click.echo(self.format(record), err=True)
        except Exception:
            self.handleError(record)


def setup_logging(level: int) -> None:
    """Send the `casern` logger to stderr at `level`; only the CLI configures logging."""
    logger = logging.getLogger("casern")
    root = logging.getLogger()
    for stale in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(stale)  # left by an earlier command of this process
    handler = next((h for h in logger.handlers if isinstance(h, _Handler)), None)
    if handler is None:
        handler = _Handler()
        handler.setFormatter(
            logging.Formatter("%(asctime)s casern %(levelname)s: %(message)s", "%H:%M:%S")
        )
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)
    # An overrunning tick is skipped and retried by design: not worth a warning.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)


@contextmanager
def root_logging(level: int) -> Iterator[None]:
    """For long runners: log everything (the user's listeners too) to stderr at `level`.

    casern's own records go through the root handler meanwhile; the per-tick and
    per-request chatter of APScheduler and httpx stays below WARNING. Undone on exit.
    """
    root = logging.getLogger()
    casern_log = logging.getLogger("casern")
    quiet = [logging.getLogger(name) for name in ("apscheduler", "httpx", "httpcore")]
    saved = (root.level, casern_log.level, casern_log.propagate, [q.level for q in quiet])
    handler = next((h for h in casern_log.handlers if isinstance(h, _Handler)), None)
    if handler is not None:
        casern_log.removeHandler(handler)
    mine = _Handler()
    mine.setFormatter(
        logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s", "%H:%M:%S")
    )
    root.addHandler(mine)
    root.setLevel(level)
    casern_log.propagate = True
    casern_log.setLevel(logging.NOTSET)
    for q in quiet:
        # httpx logs every request at INFO: a line per CouchDB call, shown only with -vv.
        debug = level <= logging.DEBUG and q.name != "apscheduler"
        q.setLevel(level if debug else max(q.level, logging.WARNING))
    try:
        yield
    finally:
        root.removeHandler(mine)
        root.setLevel(saved[0])
        casern_log.setLevel(saved[1])
        casern_log.propagate = saved[2]
        for q, old in zip(quiet, saved[3], strict=True):
            q.setLevel(old)
        if handler is not None:
            casern_log.addHandler(handler)


# -- the commands -----------------------------------------------------------------------


@click.group(
    name="casern",
    cls=_Group,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option(
    "--app",
    "app",
    envvar="CASERN_APP",
    metavar="MODULE:ATTR",
    help="The app: a casern.Casern, or a function returning one, e.g. myproject.machines:app."
    "  [env: CASERN_APP]",
)
@click.option(
    "--store",
    envvar="CASERN_STORE",
    metavar="URL",
    help="Use this store instead of the app's own: sqlite:///file.db or"
    " http://user:pass@host:5984/db (same reducers, listeners and options)."
    "  [env: CASERN_STORE]",
)
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
@click.option("-v", "--verbose", count=True, help="Log more: -v for progress, -vv for everything.")
@click.version_option(__version__, "-V", "--version", prog_name="casern")
@click.pass_context
def cli(ctx: click.Context, app: str | None, store: str | None, debug: bool, verbose: int) -> None:
    """Inspect and drive the state machines of a casern app.

    Name the app once, before the command, as MODULE:ATTRIBUTE (the current
    directory is importable):

    \b
        casern --app myproject.machines:app show order-17
        export CASERN_APP=myproject.machines:make_app
        casern send approve order-17 '{"by": "ann"}'
        casern worker

    Start with `casern demo` to watch a thousand chatbot conversations run.
    """
    levels = {0: logging.WARNING, 1: logging.INFO}
    setup_logging(levels.get(verbose, logging.DEBUG))
    ctx.obj = Options(app, store, debug, verbose)


@cli.command()
@click.argument("reducer")
@click.argument("id")
@click.argument("data", metavar="[JSON]", required=False)
@click.option("--key", help="Idempotency key: a second send with the same key applies nothing.")
@click.option(
    "--wait",
    type=click.FloatRange(0),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="How long to let the listeners of this change run before exiting.",
)
@with_app
def send(
    app: Casern, reducer: str, id: str, data: str | None, key: str | None, wait: float
) -> None:
    """Send REDUCER to machine ID with JSON data; print the committed state.

    JSON is any JSON document ('{"qty": 2}', '"text"', '3'); `-` reads it from
    stdin; without it the reducer gets null. The listeners of the change run
    before the command exits; those still running after --wait are delivered
    later by `casern worker`.

    \b
        casern send addItem cart-42 '{"sku": "A-1", "qty": 2}'
    """
    echo_json(app.send(reducer, id, parse_json(data), key=key))
    if not app.drain(wait):
        log.warning(
            "listeners still running after %gs; `casern worker` will deliver the rest", wait
        )


@cli.command()
@click.argument("id")
@with_app
def show(app: Casern, id: str) -> None:
    """Print the current state of machine ID as JSON (exit status 1 if unknown)."""
    state = app.get(id)
    if state is None:
        raise CLIError(f"no machine {id!r} in {app.store.url} (`casern ls` lists them)")
    echo_json(state)


@cli.command()
@click.argument("id")
@with_app
def history(app: Casern, id: str) -> None:
    """Print every committed change of machine ID, oldest first, as a JSON list."""
    entries = app.history(id)
    if not entries and app.get(id) is None:
        raise CLIError(f"no machine {id!r} in {app.store.url} (`casern ls` lists them)")
    echo_json(entries)


after_option = click.option("--after", default=None, metavar="ID", help="Only ids after this one.")
limit_option = click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=None,
    metavar="N",
    help="At most this many ids.  [default: all]",
)


@cli.command(name="ls")
@click.option("--prefix", default="", help="Only ids that start with this.")
@after_option
@limit_option
@with_app
def ls(app: Casern, prefix: str, after: str | None, limit: int | None) -> None:
    """List the stored machine ids, one per line, in ascending order."""
    echo_pages(lambda after, n: app.ids(prefix=prefix, after=after, limit=n), after, limit)


def echo_pages(
    fetch: Callable[[str | None, int], list[str]], after: str | None, limit: int | None
) -> None:
    """Print ids one per line, fetched in pages of 1,000 after `after`, at most `limit`."""
    left = limit
    while left is None or left > 0:
        page = fetch(after, 1000 if left is None else min(left, 1000))
        if not page:
            return
        click.echo("\n".join(page))
        after = page[-1]
        if left is not None:
            left -= len(page)


@cli.command()
@click.argument("selector")
@after_option
@limit_option
@with_app
def find(app: Casern, selector: str, after: str | None, limit: int | None) -> None:
    """List the ids whose state matches SELECTOR, one per line, in ascending order.

    SELECTOR is a JSON object in CouchDB's Mango style, such as
    '{"status": "open"}' or '{"owner.team": {"$in": ["a", "b"]}}' (- reads stdin).
    """
    query = parse_json(selector, "SELECTOR", """'{"status": "open"}'""")
    echo_pages(lambda after, n: app.find(query, after=after, limit=n), after, limit)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=10_000,
    show_default=True,
    metavar="N",
    help="At most this many.",
)
@with_app
def failed(app: Casern, as_json: bool, limit: int) -> None:
    """List listener deliveries that exhausted their retries.

    Fix the cause, then re-queue them with `casern retry`.
    """
    rows = app.failed(limit)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("No failed deliveries.")
        return
    table = [("ID", "SEQ", "LISTENER", "ATTEMPTS", "ERROR")]
    table += [
        (str(r["id"]), str(r["seq"]), str(r["listener"]), str(r["attempts"]), _flat(r["error"]))
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=False)]
        click.echo("  ".join([*cells, row[4]]))


def _flat(text: object) -> str:
    """One table row per delivery: newlines and tabs become spaces (--json keeps them)."""
    return " ".join(str(text).split())


@cli.command()
@click.argument("id", required=False)
@click.option(
    "--wait",
    type=click.FloatRange(0),
    default=60.0,
    show_default=True,
    metavar="SECONDS",
    help="How long to let the re-queued deliveries run before exiting.",
)
@with_app
def retry(app: Casern, id: str | None, wait: float) -> None:
    """Re-queue failed deliveries (all, or machine ID's); print how many.

    They run again now, with the usual retries; those that fail again are
    listed by `casern failed` once more.
    """
    count = app.retry(id)
    click.echo(
        f"{count} failed deliveries re-queued" if count != 1 else "1 failed delivery re-queued"
    )
    if count and not app.drain(wait):
        log.warning("deliveries still running after %gs; `casern worker` will finish them", wait)


def log_level_option(default: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`--log-level` of the long runners (`worker`, `inspect`): see `root_level`."""
    return click.option(
        "--log-level",
        type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
        default=None,
        help="Level of the root logger: your listeners' logs show with casern's."
        f"  [default: {default}, or DEBUG with -vv]",
    )


def root_level(log_level: str | None, default: int) -> int:
    """The level `--log-level` asks for; without it `default`, or DEBUG with -vv."""
    if log_level:
        level: int = logging.getLevelName(log_level.upper())
        return level
    verbose = click.get_current_context().find_object(Options)
    return logging.DEBUG if verbose is not None and verbose.verbose >= 2 else default


@cli.command()
@click.option("--once", is_flag=True, help="Run one tick (due timers, redelivery) and exit.")
@log_level_option("INFO")
@click.option(
    "--grace",
    type=click.FloatRange(0),
    default=10.0,
    show_default=True,
    metavar="SECONDS",
    help="On a stop signal, how long to let listeners under way finish.",
)
@with_app
def worker(app: Casern, once: bool, log_level: str | None, grace: float) -> None:
    """Fire due timers and deliver pending listener work until SIGINT/SIGTERM.

    Run one or more next to the processes that send: each due timer fires once
    however many workers share a store, and changes whose listeners were cut
    short by a crash are delivered again.
    """
    with root_logging(root_level(log_level, logging.INFO)):
        _work(app, once, grace)


def _work(app: Casern, once: bool, grace: float) -> None:
    if once:
        fired = app.run_once()
        app.drain()
        log.info("fired %d due timer(s) on %s", fired, app.store.url)
        return
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("got %s, stopping", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        app.start()
        log.info(
            "worker started on %s: %d reducer(s), %d timer(s), %d listener(s), tick %gs;"
            " stop with Ctrl-C or SIGTERM",
            app.store.url,
            len(app.reducers),
            len(app.timers),
            len(app.listeners),
            app.tick,
        )
        while not stop.wait(0.5):
            pass
        app.stop()
        try:
            # From here a second Ctrl-C or SIGTERM leaves the listeners under way. Not
            # the handlers from before: SIGINT may have been ignored (a script's `&`).
            for s in previous:
                signal.signal(s, signal.default_int_handler)
            under_way = app._under_way()
            if under_way:
                log.info(
                    "waiting up to %gs for the listeners of %d change(s) under way (Ctrl-C"
                    " or SIGTERM again to leave them: the next worker delivers them)",
                    grace,
                    under_way,
                )
            app.close(timeout=grace)
        except KeyboardInterrupt:
            app.close(timeout=0.5)  # a no-op if the interrupted close() closed it already
            log.info("left the listeners still under way in the outbox for the next worker")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    log.info("worker stopped")


@cli.command()
@click.option(
    "--batch",
    type=click.IntRange(1, 10_000),
    default=200,
    show_default=True,
    metavar="N",
    help="States upgraded per page.",
)
@with_app
def migrate(app: Casern, batch: int) -> None:
    """Upgrade every stored state to the app's state_version now.

    Safe beside live traffic and resumable: states already upgraded are
    skipped. Without it, states are upgraded lazily when read.
    """
    count: Callable[[], int] | None = getattr(app.store, "count", None)
    total = count() if count is not None else _count_ids(app)
    with click.progressbar(length=total, label="Migrating", show_pos=True, file=sys.stderr) as bar:
        upgraded = app.migrate(progress=bar.update, batch=batch)
    click.echo(
        f"{upgraded} of {total} stored state(s) upgraded to state_version {app.state_version}"
    )


def _count_ids(app: Casern) -> int:
    total, after = 0, None
    while page := app.ids(after=after, limit=1000):
        total += len(page)
        after = page[-1]
    return total


@cli.command(name="inspect")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. Anything but a loopback address needs --token.",
)
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="TCP port."
)
@click.option(
    "--token",
    envvar="CASERN_INSPECT_TOKEN",
    metavar="T",
    help="Require 'Authorization: Bearer T' (or the login form) on every request."
    "  [env: CASERN_INSPECT_TOKEN]",
)
@log_level_option("WARNING")
def inspect_command(host: str, port: int, token: str | None, log_level: str | None) -> None:
    """Serve the inspector, a web page to look into the machines, until Ctrl-C.

    Machines by id prefix or `find` selector, each one's state, due timers,
    pending and failed deliveries (with a Retry button) and its history as a
    timeline of diffs. The same data as JSON under /api/.

    \b
        casern --app myproject.machines:app inspect            # http://127.0.0.1:8000/
        casern --app myproject.machines:app inspect --host 0.0.0.0 --token "$(openssl rand -hex 16)"
    """
    from .inspector._serve import check_bind, serve

    try:
        check_bind(host, token)
    except ValueError as e:
        raise CLIUsageError(str(e)) from None
    options = click.get_current_context().find_object(Options)
    assert options is not None
    # Retry re-runs listeners in this process: their logs show like the worker's.
    with root_logging(root_level(log_level, logging.WARNING)), options.open() as app:
        try:
            serve(app, host, port, token, verbose=options.verbose)
        except OSError as e:  # the port is taken, the host unknown ...
            raise CLIError(str(e)) from None


cli.add_command(demo_command, "demo")


def main(args: Sequence[str] | None = None) -> NoReturn:
    """The `casern` console script."""
    cli.main(args=args, prog_name="casern")
