"""The token lifecycle: a fresh access token for the current person, refreshed one at a time.

The provider's refresh tokens are single-use: every refresh returns a new one and kills the
old one, and strict providers revoke the whole grant when a used one is replayed. So a
refresh must never run twice with the same token, whichever thread, worker or instance
asks, and a rotated token must never be lost. The database is the one thing they all share,
so the database holds the locks:

1. Take the person's refresh turn. On PostgreSQL that is an advisory lock, taken without
   waiting, together with the person's row lock (SELECT ... FOR UPDATE), which sign-in and
   sign-out take too: one statement reads the row, locked, only if the turn was free. A
   request that finds the turn taken waits for a *shared* advisory lock instead: all waiters
   get it together the moment the refresher commits, let go of it at once and read the row
   without any lock, so they never queue behind one another. They write nothing: the
   refresher's event row counts them (pg_locks) as it is written, just before its commit.
   On SQLite the turn is the database write lock (BEGIN IMMEDIATE), which waiters take one
   after another, each for a read and a commit; there no one can count them.
   No lock is waited for longer than a refresh may take (lock_wait: PostgreSQL's lock_timeout,
   set with SET LOCAL in each transaction that takes a lock, and SQLite's busy timeout, set per
   connection in app.py); then the request gets a 503 and nothing is lost.
2. Re-read the tokens: a waiter usually finds that the refresher already refreshed them,
   and uses the result. If that refresh failed, the waiter queues for the row lock and
   looks again; only one request ever holds the row lock while it refreshes.
3. If an earlier refresh was sent but its reply never came (refresh_unsure), ask the
   provider's introspection whether the kept token still lives before replaying it.
4. Refresh at the provider (one round trip; the reply may take PROVIDER_REFRESH_TIMEOUT).
5. Durable commit: store the rotated tokens at once, with their refresh event (its one
   client-chosen value, the trigger, cleaned), in one transaction, then release the locks.
   On PostgreSQL that transaction is one statement: the event's insert, with the updates of
   the person and of their sessions' expiry as its CTEs.
   If that commit fails (database restart, deadlock, a refused event row), retry it on a
   fresh connection for ROTATION_STORE_RETRY seconds, storing the tokens alone (an event
   row must never take the tokens down with it) and the event afterwards, on its own. A
   rotation that still cannot be stored is logged at ERROR as lost_rotation. Every other
   outcome's event is recorded afterwards, in a transaction of its own (a refusal's before the
   locks are let go: see below).

What each answer of the provider means:

- invalid_grant: the grant is dead (15 days idle, revoked), or a sign-in on another device
  has just replaced it: that sign-in's code exchange revoked our token at the provider before
  it could store the new one under the row lock. So first let go of the locks and look for a
  new grant for SIGN_IN_GRACE; only then forget the grant and end all the person's sessions
  -> SignInRequired.
- Lost reply (a timeout or dropped connection after the request was sent): the provider
  may have rotated. Mark the token unsure and introspect it at once: no longer active
  means the rotation is lost (lost_rotation, handled as a dead grant); active means
  nothing happened (unavailable); no answer leaves it unsure for the next attempt.
- Unreachable or 5xx: nothing was consumed; keep everything -> RefreshUnavailable (503).
- Any other refusal (invalid_scope...): an answer, not an outage. Keep everything, do not ask
  the same again for REFUSAL_BACKOFF -> RefreshRefused (403). The refusal is recorded before the
  locks are let go, and whoever refreshes next reads it under them: the turn's statement reads it
  with the locked row (that statement seldom waits for the row lock: only behind a sign-in, a
  sign-out, or a request refreshing after a failed refresh). A request that queues at the row lock
  after a failed refresh reads it again once the lock is its own: PostgreSQL re-reads the locked
  row after such a wait, but not the statement's subqueries.
- A full refresh that comes back with nothing beyond the viewer scope: the provider narrowed
  the whole grant when asked for a viewer token (downscope.py). End that grant and stop
  downscoping -> SignInRequired with a notice saying so.

A known gap: while a failed commit is retried (step 5) the locks are released, so a request
that takes the turn in those milliseconds may replay the used token. A database restart
kills that request's connection too; a deadlock on one row under a lock does not happen.

A dead grant ends the person's sessions by expiring their rows, not deleting them: a browser
that comes back with the cookie of such a row goes through the provider with prompt=none
first (auth.py), and sees a sign-in form only if the provider's own session is gone too. A
deliberate sign-out deletes the rows, so nothing resumes it.

Sign-in and sign-out take the same row lock. save_sign_in stores a new grant under it, so
a refresh still in flight cannot overwrite it; end_sessions deletes sessions and decides
"was this the last one?" in the same locked transaction that forgets the grant, so a
sign-in on another device commits either before (and counts as remaining) or after.
"""

import functools
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from flask import current_app
from sqlalchemy import Insert, Integer, Row, Select, and_, bindparam, case, column, delete, func, insert, select, table, text, update
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import undefer_group

import downscope
import metrics
import sessions
from models import RefreshEvent, User, UserSession, db, utcnow
from provider import InvalidGrant, ProviderError, ProviderRejected, ProviderUnavailable, TokenResponse

log = logging.getLogger("tokens")

# APS v2 refresh tokens live 15 days unless the provider tells us otherwise.
REFRESH_TOKEN_LIFETIME = timedelta(days=15)
# How long a refused refresh looks for the new grant of a sign-in on another device (see _replaced_by_sign_in).
SIGN_IN_GRACE = 2.0
# The first key of PostgreSQL's two-key advisory locks that hold a person's refresh turn (the second is their id).
REFRESH_TURN = 0x52_46  # "RF"
# A provider that refused a refresh (invalid_scope...) is not asked the same again for this long.
REFUSAL_BACKOFF = timedelta(minutes=5)

# The statements of a refresh, built once: on this path, building a statement costs more than running
# it. All but the person's own row are on table columns, which spares them the ORM's work.
_users, _sessions, _events = User.__table__, UserSession.__table__, RefreshEvent.__table__
_PERSON = select(User).where(User.id == bindparam("user_id")).options(undefer_group("tokens")).execution_options(populate_existing=True)
_LOCKED_PERSON = _PERSON.with_for_update()
# The error of the person's latest refresh of this kind when that was a refusal within the backoff and
# since their sign-in; read in the statement that locks the person for a refresh, as its second column.
_refusal_in_backoff = and_(_events.c.outcome.startswith("refused:"), _events.c.at >= bindparam("refusals_since"), _events.c.at >= _users.c.signed_in_at)
_REFUSED = (
    select(case((_refusal_in_backoff, _events.c.outcome)))
    .where(_events.c.user_id == _users.c.id, _events.c.kind == bindparam("kind"))
    .order_by(_events.c.id.desc())
    .limit(1)
    .scalar_subquery()
)
_LOCKED_FOR_REFRESH = _PERSON.add_columns(_REFUSED).with_for_update(of=_users)
_REFUSED_NOW = select(_REFUSED).where(_users.c.id == bindparam("user_id"))
_turn_of_user_id = (REFRESH_TURN, bindparam("user_id", type_=Integer))
# PostgreSQL: the person's row, locked, if their refresh turn was free and is now ours; no row otherwise.
_TURN_AND_LOCKED_PERSON = _LOCKED_FOR_REFRESH.where(func.pg_try_advisory_xact_lock(*_turn_of_user_id))
_WAIT_FOR_TURN = select(func.pg_advisory_xact_lock_shared(*_turn_of_user_id))
_UPDATE_PERSON = update(_users).where(_users.c.id == bindparam("person"))
# Live sessions live as long as the refresh token that keeps them signed in; ended ones stay ended.
_SESSIONS_FOLLOW = (
    update(_sessions).where(_sessions.c.user_id == bindparam("person"), _sessions.c.expires_at > bindparam("now")).values(expires_at=bindparam("until"))
)
_RECORD_EVENT = insert(_events)
# The requests waiting for a person's refresh turn, counted as the refresher writes its event: a
# two-key advisory lock shows in pg_locks as classid = first key, objid = second key, objsubid = 2.
_pg_locks = table("pg_locks", column("locktype"), column("classid"), column("objid"), column("objsubid"), column("granted"))
_WAITING = (
    select(func.count())
    .select_from(_pg_locks)
    .where(_pg_locks.c.locktype == "advisory", _pg_locks.c.classid == REFRESH_TURN, _pg_locks.c.objsubid == 2, ~_pg_locks.c.granted)
    .where(_pg_locks.c.objid == bindparam("turn_of", type_=Integer))
)
_RECORD_EVENT_COUNTING_WAITERS = _RECORD_EVENT.values(waiters=_WAITING.scalar_subquery())


class SignInRequired(Exception):
    """The person's refresh token is dead: they must sign in again (notice: what to tell them about why)."""

    def __init__(self, reason: str = "", notice: str | None = None):
        super().__init__(reason)
        self.notice = notice


class RefreshUnavailable(Exception):
    """A refresh could not be done now (provider down, or the lock wait timed out); nothing was lost."""


class RefreshRefused(Exception):
    """The provider refused the refresh for a reason other than a dead grant (invalid_scope...); the sign-in stands."""

    def __init__(self, error: str):
        super().__init__(error)
        self.error = error


@dataclass(frozen=True)
class ViewerToken:
    access_token: str
    expires_at: datetime
    scope: str


def lock_wait(cfg: dict) -> float:
    """Return how long, in seconds, a request waits for a lock: as long as a refresh may take."""
    return cfg["PROVIDER_REFRESH_TIMEOUT"] + 2 * cfg["PROVIDER_TIMEOUT"]


def is_stale(expires_at: datetime | None) -> bool:
    """Tell whether a token is missing (no expiry stored) or expires within TOKEN_REFRESH_LEEWAY seconds."""
    if expires_at is None:
        return True
    leeway = timedelta(seconds=current_app.config["TOKEN_REFRESH_LEEWAY"])
    return expires_at - leeway <= utcnow()


def save_sign_in(subject: str, name: str, email: str, tokens: TokenResponse) -> User:
    """Store a fresh sign-in's tokens under the person's row lock; they replace the old ones for all sessions.

    The lock matters: a refresh still in flight with the previous refresh token must not
    overwrite the new one when it finishes.
    """
    user = _lock_subject(subject)
    now = utcnow()
    user.name, user.email = name, email
    user.access_token = tokens.access_token
    user.access_expires_at = now + timedelta(seconds=tokens.expires_in)
    user.refresh_token = tokens.refresh_token
    user.refresh_issued_at = user.signed_in_at = now
    user.refresh_expires_at = now + REFRESH_TOKEN_LIFETIME
    user.refresh_rotations = 0
    user.refresh_unsure = False
    # A viewer keeps the access token it holds, but the next one comes from the new grant.
    user.viewer_token = user.viewer_expires_at = None
    return user


def end_sessions(user_id: int, id_hashes: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """End some of the person's sessions (all when id_hashes is None); with the last one, forget the grant.

    Return the tokens to revoke at the provider, as (token, token_type_hint) pairs.
    """
    user = _lock_user(user_id)
    if user is None:
        db.session.rollback()
        return []
    ended = delete(UserSession).where(UserSession.user_id == user_id)
    if id_hashes is not None:
        ended = ended.where(UserSession.id_hash.in_(list(id_hashes)))
    db.session.execute(ended)
    revocable = _forget_tokens(user) if sessions.remaining(user_id) == 0 else []
    db.session.commit()
    return revocable


def end_grant(user_id: int, outcome: str, trigger: str) -> list[tuple[str, str]]:
    """Forget a grant the provider no longer honours and end every session that relied on it."""
    started = time.monotonic()
    user = _lock_user(user_id)
    if user is None:
        db.session.rollback()
        return []
    revocable = _forget_tokens(user)
    sessions.expire_all(user_id)
    db.session.commit()
    _finish(user_id, "access", outcome, trigger, (started, started))
    return revocable


def revoke(revocable: list[tuple[str, str]]) -> None:
    """Revoke forgotten tokens at the provider, best effort: we no longer hold them anyway."""
    provider = current_app.extensions["provider"]
    for token, hint in revocable:
        try:
            provider.revoke(token, hint)
        except ProviderError:
            log.warning(json.dumps({"event": "revoke_failed", "token_type": hint}))


def _forget_tokens(user: User) -> list[tuple[str, str]]:
    """Clear the person's tokens in the current transaction; return the live ones to revoke."""
    revocable = [(user.refresh_token, "refresh_token"), (user.access_token, "access_token"), (user.viewer_token, "access_token")]
    user.clear_tokens()
    return [(token, hint) for token, hint in revocable if token]


def _lock_subject(subject: str) -> User:
    """Return the person with this subject, row-locked, creating them if they are new."""
    user_id = db.session.execute(select(User.id).where(User.subject == subject)).scalar_one_or_none()
    if user_id is None:
        db.session.add(User(subject=subject))
        try:
            db.session.commit()
        except IntegrityError:
            db.session.rollback()  # a concurrent first sign-in of the same person created the row
        user_id = db.session.execute(select(User.id).where(User.subject == subject)).scalar_one()
    user = _lock_user(user_id)
    if user is None:
        raise SignInRequired("person was removed during sign-in")
    return user


def ensure_fresh_access_token(user: User, trigger: str, rejected: str | None = None) -> User:
    """Return the person with an access token that outlives the leeway, refreshing it if needed.

    rejected: an access token the provider just refused; it counts as stale even if unexpired.
    """
    # Only the expiry is read here: the tokens themselves stay encrypted until a request uses one.
    if not is_stale(user.access_expires_at) and (rejected is None or user.access_token != rejected):
        return user
    return _refresh(user.id, "access", trigger, rejected)


def viewer_token(user: User, trigger: str) -> ViewerToken:
    """Return the viewer-scoped access token, refreshing with the narrower scope when it is stale."""
    if is_stale(user.viewer_expires_at):
        user = _refresh(user.id, "viewer", trigger)
    return ViewerToken(user.viewer_token, user.viewer_expires_at, user.viewer_scope or "")


def _refresh(user_id: int, kind: str, trigger: str, rejected: str | None = None) -> User:
    """Refresh the person's access (or viewer) token, holding their refresh turn and row lock."""
    started = time.monotonic()
    user, refused, waited = _take_refresh_turn(user_id, kind)
    if waited and user is not None and not _is_fresh(user, kind, rejected):
        # That refresh failed: queue at the row lock, then look again (rare).
        (user, refused), waited = _lock_for_refresh(user_id, kind), False
    timing = (started, time.monotonic())
    if user is None:
        db.session.rollback()
        raise SignInRequired("person no longer exists")
    if _is_fresh(user, kind, rejected):
        # Another request refreshed before us: use its result, writing nothing, so no one queues behind us.
        if not waited:
            db.session.commit()  # let go of our locks; a waiter holds none, and keeps the person it read loaded
        metrics.observe_wait(timing[1] - timing[0])  # on SQLite the wait is for the write lock, on PostgreSQL for the turn
        _log(user_id, kind, "used_fresh", timing, trigger)
        return user
    if not user.refresh_token:
        db.session.rollback()
        raise SignInRequired("no refresh token stored")
    if refused:
        db.session.rollback()
        raise RefreshRefused(refused.removeprefix("refused:"))
    if user.refresh_unsure:
        _settle_unsure(user, kind, trigger, timing)

    scope = current_app.config["OAUTH_VIEWER_SCOPE"] if kind == "viewer" else None
    used = user.refresh_token
    asked = time.monotonic()
    try:
        reply = current_app.extensions["provider"].refresh(used, scope=scope)
    except InvalidGrant:
        if not user.refresh_unsure and _replaced_by_sign_in(user_id, used):
            return _refresh(user_id, kind, trigger, rejected)  # with the grant that sign-in stored
        user = _lock_user(user_id)
        if user is None or user.refresh_token != used:
            db.session.commit()
            return _refresh(user_id, kind, trigger, rejected)  # a newer grant arrived after all (or none is left)
        # A replay after a lost reply (no introspection to ask first) is a lost rotation, not an expiry.
        _forget(user, kind, "lost_rotation" if user.refresh_unsure else "invalid_grant", trigger, timing)
        raise SignInRequired("refresh token expired, revoked or replaced") from None
    except ProviderRejected as exc:
        # A refusal is an answer, not an outage: the token was not consumed, and asking again gets the same
        # answer. Record it before letting go of the locks, so whoever takes them next reads it.
        _finish(user_id, kind, f"refused:{exc.error}"[:32], trigger, timing, reason=str(exc))
        raise RefreshRefused(exc.error) from None
    except ProviderError as exc:
        if isinstance(exc, ProviderUnavailable) and exc.delivered:
            user.refresh_unsure = True
            _settle_unsure(user, kind, trigger, timing)
        db.session.commit()  # keeps refresh_unsure when we could not find out
        _finish(user_id, kind, "unavailable", trigger, timing, reason=str(exc))
        raise RefreshUnavailable(str(exc)) from None

    provider_ms = _ms(asked)
    if kind == "access" and downscope.narrowed_grant(reply.scope):
        _forget(user, kind, downscope.NARROWED, trigger, timing)
        downscope.note_narrowed_grant(user_id, reply)
        raise SignInRequired("the provider narrowed the whole grant", notice=downscope.NOTICE)
    user, recorded = _store_rotation(user_id, user, kind, used, reply, scope, trigger, started)
    if recorded:
        _log(user_id, kind, "refreshed", timing, trigger, provider_ms=provider_ms)
    else:
        _finish(user_id, kind, "refreshed", trigger, timing, provider_ms=provider_ms)
    return user


def _replaced_by_sign_in(user_id: int, used: str) -> bool:
    """Tell whether a sign-in on another device stored a new grant within SIGN_IN_GRACE of our refresh being refused.

    That sign-in's code exchange made the provider revoke the token we hold (one refresh token
    per person per app) before it could store the new one under the row lock we hold: let go of
    the locks and look for its grant for a moment, rather than end every session of the person.
    """
    db.session.commit()
    deadline = time.monotonic() + SIGN_IN_GRACE
    while time.monotonic() < deadline:
        time.sleep(0.1)
        stored = db.session.execute(select(User.refresh_token).where(User.id == user_id)).scalar_one_or_none()
        db.session.commit()
        if stored != used:
            return True
    return False


def _settle_unsure(user: User, kind: str, trigger: str, timing: tuple[float, float]) -> None:
    """Find out whether a refresh whose reply was lost rotated the kept token; a rotation we never stored is lost.

    Replaying the kept token would tell too, but a strict provider answers a replay by revoking the grant.
    """
    try:
        active = current_app.extensions["provider"].introspect(user.refresh_token).get("active")
    except ProviderError:
        return  # no introspection, or no answer: stay unsure, the refresh will tell
    if active is False:
        _forget(user, kind, "lost_rotation", trigger, timing)
        raise SignInRequired("the provider rotated the refresh token but its reply was lost")
    user.refresh_unsure = False


def _store_rotation(user_id: int, user: User, kind: str, used: str, reply: TokenResponse, scope: str | None, trigger: str, started: float) -> tuple[User, bool]:
    """Commit the rotated tokens with their refresh event in a transaction of their own; retry on a fresh connection when the commit fails.

    Return the person and whether the event was stored with the tokens. A retry stores the tokens
    alone (whatever refused the first commit may have been the event row); the caller records the
    event afterwards.
    """
    deadline = time.monotonic() + current_app.config["ROTATION_STORE_RETRY"]
    pause, attempt = 0.05, 0
    while True:
        try:
            if attempt:
                user = _lock_user(user_id)
                if user is None or user.refresh_token != used:
                    # A sign-in stored a newer grant (or the grant ended) meanwhile: ours is already dead.
                    db.session.commit()
                    if user is None or not user.refresh_token:
                        raise SignInRequired("the grant ended while its rotation was being stored")
                    return user, False
            _apply_refresh(user, kind, reply, scope, event=None if attempt else _event(user_id, kind, "refreshed", trigger, started))
            db.session.commit()
            return user, not attempt
        except (SQLAlchemyError, RefreshUnavailable) as exc:
            db.session.rollback()
            reason = type(exc.__cause__ or exc).__name__  # never the statement's parameters: they hold tokens
            if time.monotonic() + pause > deadline:
                log.error(json.dumps({"event": "token_refresh", "user_id": user_id, "kind": kind, "outcome": "lost_rotation", "reason": reason}))
                metrics.count_refresh(kind, "lost_rotation", time.monotonic() - started)
                raise RefreshUnavailable("the rotated refresh token could not be stored") from None
            log.warning(json.dumps({"event": "rotation_store_retry", "user_id": user_id, "attempt": attempt, "reason": reason}))
            time.sleep(pause)
            pause, attempt = min(pause * 2, 1.0), attempt + 1


def _is_fresh(user: User, kind: str, rejected: str | None) -> bool:
    expires_at = user.access_expires_at if kind == "access" else user.viewer_expires_at
    return not is_stale(expires_at) and (rejected is None or user.access_token != rejected)


def _take_refresh_turn(user_id: int, kind: str) -> tuple[User | None, str | None, bool]:
    """Become the one request that refreshes this person, or wait for the one that is and read its result.

    Return the person (row-locked when it is our turn), their recent refusal of this kind (when it
    is our turn) and whether we waited for another refresher.
    On PostgreSQL the turn is a transaction-scoped advisory lock, taken without waiting in the same
    statement that locks the person's row: whoever gets it refreshes, holding the row lock too.
    Everyone else waits for it with a shared advisory lock, which all of them get together the
    moment the refresher commits, and then reads the row with no lock at all, so waiters never
    queue behind one another. SQLite has one database-wide write lock instead: waiters take it in
    turn, each for a read and a commit.
    """
    if db.engine.dialect.name != "postgresql":
        return *_lock_for_refresh(user_id, kind), False
    db.session.commit()  # the turn must be the first thing of its own transaction
    try:
        _limit_lock_wait()
        row = db.session.execute(_TURN_AND_LOCKED_PERSON, _refresh_read(user_id, kind)).first()
        if row is not None:
            return *row, False
        # The turn is taken (or the person is gone, which the read after the wait tells).
        db.session.execute(_WAIT_FOR_TURN, {"user_id": user_id})
    except OperationalError as exc:
        db.session.rollback()
        raise RefreshUnavailable("timed out waiting for another refresh of this person") from exc
    db.session.commit()  # the refresher has committed: let go of the shared lock at once, and read its result
    return db.session.execute(_PERSON, {"user_id": user_id}).scalar_one_or_none(), None, True


def _lock_user(user_id: int) -> User | None:
    """Start a new transaction holding the person's row lock, and re-read the row under it."""
    row = _locked(_LOCKED_PERSON, {"user_id": user_id})
    return row[0] if row else None


def _lock_for_refresh(user_id: int, kind: str) -> tuple[User | None, str | None]:
    """Lock the person's row as _lock_user does, and read their recent refusal of this kind under the lock."""
    params = _refresh_read(user_id, kind)
    if db.engine.dialect.name != "postgresql":
        row = _locked(_LOCKED_FOR_REFRESH, params)  # read once SQLite's write lock is ours: the refusal is current
        return tuple(row) if row else (None, None)
    # Here the row lock may be waited for, behind a request refused meanwhile, and a PostgreSQL statement
    # that waits for a row lock re-reads the locked row but not its subqueries: read the refusal afterwards.
    user = _lock_user(user_id)
    return user, db.session.execute(_REFUSED_NOW, params).scalar() if user else None


def _locked(statement: Select, params: dict) -> Row | None:
    """Start a new transaction holding the person's row lock, and run the statement that reads them under it."""
    db.session.commit()  # the lock must be the first thing of its own transaction
    try:
        if db.engine.dialect.name == "sqlite":
            # SQLite has no row locks: take the database write lock up front (waits up to the busy timeout).
            db.session.execute(text("BEGIN IMMEDIATE"))
        else:
            _limit_lock_wait()
        return db.session.execute(statement, params).first()
    except OperationalError as exc:
        db.session.rollback()
        raise RefreshUnavailable("timed out waiting for another refresh of this person") from exc


def _limit_lock_wait() -> None:
    """Make this PostgreSQL transaction wait for a lock no longer than a refresh may take, then fail (a 503)."""
    # SET LOCAL, not a connection setting: a transaction-mode pooler hands each transaction another server connection.
    db.session.execute(text(f"SET LOCAL lock_timeout = {int(lock_wait(current_app.config) * 1000)}"))


def _refresh_read(user_id: int, kind: str) -> dict:
    """Return the parameters of the statements that read the person for a refresh of this kind."""
    return {"user_id": user_id, "kind": kind, "refusals_since": utcnow() - REFUSAL_BACKOFF}


def _apply_refresh(user: User, kind: str, tokens: TokenResponse, scope: str | None, event: dict | None = None) -> None:
    """Write a refresh's tokens to the person's row (and, when the refresh token rotated, their sessions' expiry), with its event when given."""
    now = utcnow()
    expires_at = now + timedelta(seconds=tokens.expires_in)
    if kind == "viewer":
        values = {"viewer_token": tokens.access_token, "viewer_expires_at": expires_at, "viewer_scope": tokens.scope or scope}
    else:
        values = {"access_token": tokens.access_token, "access_expires_at": expires_at}
    values["refresh_unsure"] = False
    follow = {}
    if tokens.refresh_token:  # some OIDC providers do not rotate; APS always does
        refresh_expires_at = now + REFRESH_TOKEN_LIFETIME
        values.update(refresh_token=tokens.refresh_token, refresh_issued_at=now, refresh_expires_at=refresh_expires_at)
        values["refresh_rotations"] = user.refresh_rotations + 1  # we hold the row lock
        follow = {"now": now, "until": refresh_expires_at}
    if event is not None and db.engine.dialect.name == "postgresql":
        # Named apart from every column: a parameter named like one would be set in each statement's columns too.
        params = {f"new_{name}": value for name, value in values.items()} | {f"event_{name}": value for name, value in event.items()}
        db.session.execute(_writes_with_event(tuple(values), tuple(event)), {"person": user.id, "turn_of": user.id, **params, **follow})
        return
    if follow:
        db.session.execute(_SESSIONS_FOLLOW, {"person": user.id, **follow})
    db.session.execute(_UPDATE_PERSON, {"person": user.id, **values})
    if event is not None:
        db.session.execute(_RECORD_EVENT, event)  # SQLite cannot tell who waits


@functools.cache
def _writes_with_event(columns: tuple[str, ...], event_columns: tuple[str, ...]) -> Insert:
    """Build, once per set of columns, a refresh's writes as one PostgreSQL statement: the event's insert, the rest as its CTEs.

    One round trip instead of three. The event counts the requests waiting for this refresh.
    """
    person = _UPDATE_PERSON.values({name: bindparam(f"new_{name}") for name in columns}).cte("person")
    event = {name: bindparam(f"event_{name}") for name in event_columns}
    statement = _RECORD_EVENT_COUNTING_WAITERS.values(event).add_cte(person)
    return statement.add_cte(_SESSIONS_FOLLOW.cte("sessions")) if "refresh_token" in columns else statement  # it rotated


def _forget(user: User, kind: str, outcome: str, trigger: str, timing: tuple[float, float]) -> None:
    """Clear a dead grant: the person's tokens and every session that relied on them."""
    user_id = user.id
    user.clear_tokens()
    sessions.expire_all(user_id)
    db.session.commit()
    _finish(user_id, kind, outcome, trigger, timing)


def _finish(user_id: int, kind: str, outcome: str, trigger: str, timing: tuple[float, float], reason: str = "", provider_ms: float | None = None) -> None:
    """Record the refresh event, committing it with the current transaction (whose locks go with it), and log it; losing the record loses nothing else."""
    try:
        db.session.execute(_RECORD_EVENT, _event(user_id, kind, outcome, trigger, timing[0]))
        db.session.commit()
    except SQLAlchemyError as exc:
        db.session.rollback()
        log.warning(json.dumps({"event": "refresh_event_not_recorded", "user_id": user_id, "reason": type(exc).__name__}))
    _log(user_id, kind, outcome, timing, trigger, reason, provider_ms)


def _event(user_id: int, kind: str, outcome: str, trigger: str, started: float) -> dict:
    """Return a refresh event's row: its client-chosen trigger cleaned, its duration so far."""
    return {"user_id": user_id, "at": utcnow(), "kind": kind, "outcome": outcome, "trigger": _clean(trigger), "duration_ms": round(_ms(started))}


def _clean(trigger: str) -> str:
    """Keep a client-chosen request line storable: no NUL or other control characters, at most 255 characters."""
    return "".join(ch if ch.isprintable() else "\ufffd" for ch in trigger)[:255]


def _ms(started: float) -> float:
    """Return the milliseconds since started, to a tenth: a refresh's own work is a few of them."""
    return round((time.monotonic() - started) * 1000, 1)


def _log(user_id: int, kind: str, outcome: str, timing: tuple[float, float], trigger: str, reason: str = "", provider_ms: float | None = None) -> None:
    """Write one structured line per refresh; never a token."""
    started, locked = timing
    fields = {
        "event": "token_refresh",
        "user_id": user_id,
        "kind": kind,
        "outcome": outcome,
        "duration_ms": _ms(started),
        "lock_wait_ms": round((locked - started) * 1000, 1),
        "waited": locked - started > 0.05,
        "trigger": trigger,
    }
    if provider_ms is not None:
        fields["provider_ms"] = provider_ms  # the rest of duration_ms is this app's own work
    if reason:
        fields["reason"] = reason
    (log.warning if outcome == "lost_rotation" else log.info)(json.dumps(fields))
    metrics.count_refresh(kind, outcome, None if outcome == "used_fresh" else time.monotonic() - started)
