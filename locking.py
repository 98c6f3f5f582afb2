"""How requests take turns with a person's grant: one locking strategy per database, chosen once at start-up.

Every thread, worker and instance shares the database, so the database holds the locks. Two
locks matter: the person's row lock, which a refresh, a sign-in and a sign-out all take before
they change the person's tokens, and the person's refresh turn, which only refreshes take, so
that requests waiting for a refresh can wait side by side instead of one after another.

- PostgreSQL: the row lock is SELECT ... FOR UPDATE; the turn is a transaction-scoped advisory
  lock, taken without waiting. A request that finds the turn taken waits for a shared advisory
  lock on the same key, which every waiter gets at once the moment the refresher commits.
  Transaction-scoped locks and SET LOCAL keep no state on the connection, so a transaction-mode
  pooler (PgBouncer) in front changes nothing.
- SQLite: one database-wide write lock (BEGIN IMMEDIATE) is both: waiters take it in turn.

No lock is waited for longer than a refresh may take (lock_wait): then LockTimeout, and nothing changed.
A refresh ahead of expiry does not wait for a person's turn on PostgreSQL (take_turn with wait=False);
on SQLite it waits for the write lock like every writer, after its response.
"""

import contextlib
from collections.abc import Iterator
from typing import TypeVar

from flask import Flask, current_app
from sqlalchemy import ColumnElement, Select, column, func, literal, select, table, text
from sqlalchemy.exc import OperationalError

from models import db

T = TypeVar("T")
# The first key of the two-key advisory locks that hold a person's refresh turn (the second is their id).
REFRESH_TURN = 0x52_46  # "RF"
# A two-key advisory lock shows in pg_locks as classid = first key, objid = second key, objsubid = 2.
_pg_locks = table("pg_locks", column("locktype"), column("classid"), column("objid"), column("objsubid"), column("granted"))


class LockTimeout(Exception):
    """A lock was held longer than a refresh may take (a stuck refresh, sign-in or sign-out): nothing changed, try again."""


def lock_wait(config: dict) -> float:
    """Return how long, in seconds, a request waits for a lock: as long as a refresh may take."""
    return config["PROVIDER_REFRESH_TIMEOUT"] + 2 * config["PROVIDER_TIMEOUT"]


class PostgreSQLLocks:
    """Row locks, and an advisory lock per person for their refresh turn that waiters share."""

    def __init__(self, wait: float):
        self._limit_wait = text(f"SET LOCAL lock_timeout = {int(wait * 1000)}")

    def begin(self) -> None:
        """Start a transaction whose lock waits give up after lock_wait."""
        db.session.commit()
        db.session.execute(self._limit_wait)

    def take_turn(self, user_id: int, wait: bool = True) -> bool:
        """Start a transaction holding the person's refresh turn; False when another request held it and has now let go.

        wait=False: False at once while another request holds it (a refresh ahead of expiry gives way).
        """
        self.begin()
        with _lock_wait_ends():
            if db.session.execute(select(func.pg_try_advisory_xact_lock(REFRESH_TURN, user_id))).scalar():
                return True
            if wait:
                db.session.execute(select(func.pg_advisory_xact_lock_shared(REFRESH_TURN, user_id)))
        db.session.commit()  # let go of the shared lock at once: the next refresher, if one is needed, must not wait for us
        return False

    def waiting(self, user_id: int) -> ColumnElement[int]:
        """Count, as a statement runs, the requests waiting for the person's refresh turn."""
        waiting = select(func.count()).select_from(_pg_locks)
        waiting = waiting.where(_pg_locks.c.locktype == "advisory", _pg_locks.c.classid == REFRESH_TURN, _pg_locks.c.objsubid == 2)
        return waiting.where(_pg_locks.c.objid == user_id, ~_pg_locks.c.granted).scalar_subquery()


class SQLiteLocks:
    """The database write lock, taken up front: it is the row lock and the refresh turn at once."""

    def begin(self) -> None:
        """Start a transaction holding the write lock; waiting for it gives up after lock_wait (the busy timeout, app.py)."""
        db.session.commit()
        with _lock_wait_ends():
            db.session.execute(text("BEGIN IMMEDIATE"))

    def take_turn(self, user_id: int, wait: bool = True) -> bool:
        """Start a transaction holding the write lock, which is everyone's turn in turn.

        wait=False waits all the same: the write lock is the whole database's, so giving way would give
        way to every other person's refresh and sign-in, and a refresh ahead waits after its response anyway.
        """
        self.begin()
        return True

    def waiting(self, user_id: int) -> ColumnElement[int]:
        return literal(0)  # waiters queue for the write lock, where no one can count them


def read_locked(query: Select[tuple[T]]) -> T | None:
    """Read one row under its row lock (SELECT ... FOR UPDATE) in the current transaction; a wait that gives up raises LockTimeout."""
    with _lock_wait_ends():
        return db.session.execute(query.with_for_update()).scalar_one_or_none()


@contextlib.contextmanager
def _lock_wait_ends() -> Iterator[None]:
    """Turn a lock wait that gave up into LockTimeout, rolling back; other database errors go on as they are."""
    try:
        yield
    except OperationalError as exc:
        if not _is_lock_timeout(exc):
            raise
        db.session.rollback()
        raise LockTimeout("a lock was held longer than a refresh may take") from exc


def _is_lock_timeout(exc: OperationalError) -> bool:
    # PostgreSQL's lock_not_available (SQLSTATE 55P03); SQLite's busy timeout.
    return getattr(exc.orig, "sqlstate", None) == "55P03" or "database is locked" in str(exc.orig)


def init_app(app: Flask) -> None:
    """Choose the locking strategy of the app's database."""
    with app.app_context():
        postgresql = db.engine.dialect.name == "postgresql"
    app.extensions["locks"] = PostgreSQLLocks(lock_wait(app.config)) if postgresql else SQLiteLocks()


def current() -> PostgreSQLLocks | SQLiteLocks:
    """Return the app's locking strategy."""
    return current_app.extensions["locks"]
