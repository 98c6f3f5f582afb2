"""A fresh token for the signed-in person: the refresh protocol.

The provider's refresh tokens are single-use: every refresh returns a new one and kills the old
one, and strict providers revoke the whole grant when a used one is replayed. So a refresh must
never run twice with the same token, whichever thread, worker or instance asks, and a rotated
token must never be lost. An attempt (`refresh` below) goes round this loop until it has a
fresh token or an answer to give:

1. Take the person's refresh turn (locking.py). One request holds it, with the person's row
   lock; on PostgreSQL the others wait for it side by side and hold nothing afterwards, on
   SQLite they take the database write lock one after another.
2. Read the person. A fresh token (another request refreshed it meanwhile) is used as it is,
   writing nothing, so no one queues behind a reader. A waiter that finds it still stale (its
   refresher failed) goes round again, for the turn itself.
3. Do not ask what cannot succeed: no grant stored is a sign-in; a refusal within
   REFUSAL_BACKOFF is the answer again. A refresh whose reply was lost (refresh_unsure) first
   asks the provider's introspection whether the kept token still lives: a replay would make
   a strict provider revoke the grant. Its "inactive" is believed only from a provider whose
   introspection called a live refresh token active (learn_introspection, at a sign-in); from
   any other, the refresh itself tells.
4. Refresh at the provider (one round trip, up to PROVIDER_REFRESH_TIMEOUT), holding the locks.
5. Store the rotation with its event and commit: the locks go with the commit. If the commit
   fails (a database restart), retry it on a fresh connection for ROTATION_STORE_RETRY seconds,
   storing the tokens alone; a rotation that still cannot be stored is a lost_rotation.

What else the provider may answer, each recorded (events.record) before the locks are let go:

- invalid_grant: the grant is dead (15 days idle, revoked), or a sign-in on another device has
  just replaced it: that sign-in's code exchange revoked our token before it could store the new
  one under the row lock we hold. So let go and look for a new grant for SIGN_IN_GRACE (found:
  round again); then forget the grant and end the person's sessions -> SignInRequired.
- A lost reply (a timeout or dropped connection after the request was sent): the provider may
  have rotated. Mark the token unsure and introspect it: no longer active (believed: step 3) means the rotation is
  lost (lost_rotation, a dead grant); active means nothing happened; no answer leaves it unsure
  for the next attempt. -> ProviderUnavailable (503).
- Unreachable or 5xx: nothing was consumed; keep everything -> ProviderUnavailable (503).
- Any other refusal (invalid_scope...): an answer, not an outage. Keep everything; do not ask
  the same again for REFUSAL_BACKOFF -> ProviderRejected (403).
- A full refresh that comes back with nothing beyond the viewer scope: the provider narrowed the
  whole grant (downscope.py). End it and stop downscoping -> SignInRequired with a notice. A
  provider that names no scope in its reply is found out later, when a resource server answers
  insufficient_scope to the token of the first full refresh after a narrowed one (bearer.py).

Ahead of expiry: a request that finds its access token within TOKEN_REFRESH_AHEAD of the leeway
is served with it, and refresh_ahead runs the same attempt once round after the response
(after_response.py). It never waits for the turn: a request that holds it refreshes, and a token that
changed meanwhile (refreshed, signed in anew, signed out: read under the lock) is left alone.

No lock is waited for longer than a refresh may take: then LockTimeout (503), nothing changed.
A known gap: while a failed commit is retried (step 5) the locks are released, so a request that
takes the turn in those milliseconds may replay the used token. A database restart kills that
request's connection too; a deadlock on one row under a lock does not happen.
"""

import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import NoReturn

from flask import current_app
from sqlalchemy.exc import SQLAlchemyError

import after_response
import downscope
import events
import grants
import locking
from events import Outcome
from grants import SignInRequired
from models import User, db, utcnow
from provider import InvalidGrant, ProviderError, ProviderRejected, ProviderUnavailable, TokenResponse

log = logging.getLogger("tokens")

# A provider that refused a refresh (invalid_scope...) is not asked the same again for this long.
REFUSAL_BACKOFF = timedelta(minutes=5)


@dataclass(frozen=True)
class ViewerToken:
    access_token: str
    expires_at: datetime
    scope: str


def is_stale(expires_at: datetime | None) -> bool:
    """Tell whether a token is missing (no expiry stored) or expires within TOKEN_REFRESH_LEEWAY seconds."""
    if expires_at is None:
        return True
    leeway = timedelta(seconds=current_app.config["TOKEN_REFRESH_LEEWAY"])
    return expires_at - leeway <= utcnow()


def is_due_ahead(user: User) -> bool:
    """Tell whether a valid access token counts as expired within TOKEN_REFRESH_AHEAD seconds, and has served half its time."""
    window = timedelta(seconds=current_app.config["TOKEN_REFRESH_AHEAD"])
    issued = _issued_at(user)
    if not window or user.access_expires_at is None or issued is None:
        return False
    stale_at = user.access_expires_at - timedelta(seconds=current_app.config["TOKEN_REFRESH_LEEWAY"])
    # Short-lived tokens would otherwise be due ahead as soon as they are issued: a refresh per request.
    return stale_at - min(window, (stale_at - issued) / 2) <= utcnow()


def _issued_at(user: User) -> datetime | None:
    # The hook's read brings the latest access refresh; a request without it counts from the sign-in.
    at, outcome = getattr(user, "last_refresh_at", None), getattr(user, "last_refresh_outcome", None)
    if at is not None and outcome == Outcome.REFRESHED and (user.signed_in_at is None or at > user.signed_in_at):
        return at
    return user.signed_in_at


def refresh_if_due(person: User, trigger: str) -> User | None:
    """Refresh a stale access token now and return the person; schedule one due ahead (is_due_ahead) for after the response."""
    if is_stale(person.access_expires_at):
        return refresh(person.id, "access", trigger)
    if is_due_ahead(person):
        after_response.run(("access", person.id), refresh_ahead, person.id, person.access_expires_at, trigger)
    return None


def ensure_fresh_access_token(user: User, trigger: str, rejected: str | None = None) -> User:
    """Return the person with an access token that outlives the leeway, refreshing it if needed.

    rejected: an access token a resource server just refused; it counts as stale even if unexpired.
    """
    # Only the expiry is read here: the tokens themselves stay encrypted until a request uses one.
    if not is_stale(user.access_expires_at) and (rejected is None or user.access_token != rejected):
        return user
    return refresh(user.id, "access", trigger, rejected)


def refresh_ahead(user_id: int, expires_at: datetime, trigger: str) -> None:
    """Refresh the access token that expires at expires_at, after a response: only if no other request holds the turn or replaced it.

    The same protocol as refresh, once round: it does not wait for the person's turn (locking.py), and a
    token that has changed since the request saw it (refreshed elsewhere, a new sign-in, a sign-out) is left alone.
    """
    attempt = Attempt(user_id, "access", f"{trigger[:240]} {events.AHEAD}", ahead_of=expires_at)
    user = attempt.take_turn()
    if not attempt.holds_turn or attempt.is_fresh(user):
        db.session.commit()  # another request refreshes it, or did already: nothing to do
        return
    attempt.check(user)
    reply = attempt.ask(user)
    if reply is not None:
        attempt.store(user, reply)


def viewer_token(user: User, trigger: str) -> ViewerToken:
    """Return the viewer-scoped access token, refreshing with the narrower scope when it is stale (OAUTH_VIEWER_TOKEN=refresh).

    With OAUTH_VIEWER_TOKEN=authorize the viewer's token comes from an authorization of its own instead (viewer_authorization.py).
    """
    if is_stale(user.viewer_expires_at):
        user = refresh(user.id, "viewer", trigger)
    return ViewerToken(user.viewer_token, user.viewer_expires_at, user.viewer_scope or "")


def refresh(user_id: int, kind: str, trigger: str, rejected: str | None = None) -> User:
    """Refresh the person's access (or viewer) token once, however many requests ask at the same time (the module's docstring)."""
    attempt = Attempt(user_id, kind, trigger, rejected)
    while True:
        user = attempt.take_turn()
        if attempt.is_fresh(user):
            events.record(attempt, Outcome.USED_FRESH, write=False)
            return user
        if not attempt.holds_turn:
            continue  # the refresher failed: try for the turn ourselves
        attempt.check(user)
        reply = attempt.ask(user)
        if reply is None:
            continue  # a sign-in on another device stored a new grant meanwhile: refresh that one
        return attempt.store(user, reply)


def _refused_lately(user: User, kind: str) -> str | None:
    """Return the provider's error when it refused the person's latest refresh of this kind within REFUSAL_BACKOFF, since their sign-in."""
    last = events.latest(user.id, kind)
    if last is None or last.outcome != Outcome.REFUSED or last.at < utcnow() - REFUSAL_BACKOFF:
        return None
    if user.signed_in_at is not None and last.at < user.signed_in_at:
        return None  # a new grant: a new question
    return last.cause or Outcome.REFUSED.value


# app.extensions key: whether this provider's introspection was seen to call a live refresh token
# active. Some introspect only access tokens and call every refresh token inactive: their "inactive"
# alone must never end a sign-in as a lost rotation.
INTROSPECTS_REFRESH_TOKENS = "introspects_refresh_tokens"


def learn_introspection(refresh_token: str) -> None:
    """Ask the provider's introspection, once per worker, about a refresh token just issued, to learn whether its "inactive" can be believed."""
    if INTROSPECTS_REFRESH_TOKENS in current_app.extensions:
        return
    try:
        active = current_app.extensions["provider"].introspect(refresh_token).get("active")
    except ProviderError:
        return  # no introspection, or no answer: ask again at the next sign-in
    current_app.extensions[INTROSPECTS_REFRESH_TOKENS] = active is True


def note_rejected_token(user_id: int, trigger: str) -> None:
    """Log that a resource server refused even a freshly renewed access token; the grant stands (bearer.py)."""
    events.record(Attempt(user_id, "access", trigger), Outcome.TOKEN_REJECTED, write=False)


def end_narrowed_grant(user_id: int, trigger: str) -> NoReturn:
    """End a grant that a provider narrowed quietly (its reply named no scope), stop downscoping, and say why."""
    attempt = Attempt(user_id, "access", trigger)
    user = grants.lock(user_id)
    if user is None or not user.refresh_token:
        db.session.rollback()
        raise SignInRequired("no grant stored")
    downscope.note_narrowed_grant(user_id, None, None)  # its refresh token is revoked with the rest, below
    revocable = grants.forget(user)
    events.record(attempt, Outcome.GRANT_NARROWED)
    grants.revoke(revocable)
    raise SignInRequired("the grant ended: grant_narrowed", notice=downscope.NOTICE)


@dataclass
class Attempt:
    """One request's attempt to get a fresh token of one kind for one person, and what it learnt on the way."""

    user_id: int
    kind: str  # "access" or "viewer"
    trigger: str  # the request that asked, for the event
    rejected: str | None = None  # an access token a resource server refused: stale even if unexpired
    started: float = field(default_factory=time.monotonic)
    holds_turn: bool = False
    waited: bool = False  # for another request's refresh
    lock_wait: float = 0.0  # seconds
    provider_ms: float | None = None
    ahead_of: datetime | None = None  # a refresh ahead of expiry: the access token's expiry it replaces

    @property
    def scope(self) -> str | None:
        return current_app.config["OAUTH_VIEWER_SCOPE"] if self.kind == "viewer" else None

    def take_turn(self) -> User:
        """Take the person's refresh turn and read them: locked when the turn is ours, unlocked after another's."""
        asked = time.monotonic()
        try:
            self.holds_turn = locking.current().take_turn(self.user_id, wait=self.ahead_of is None)
            waited_for = time.monotonic() - asked
            self.lock_wait += waited_for
            if not self.holds_turn:
                self.waited = True
            user = grants.read_locked(self.user_id) if self.holds_turn else grants.read(self.user_id)
        except locking.LockTimeout:
            events.record(self, Outcome.UNAVAILABLE, reason="a lock was held longer than a refresh may take", write=False)
            raise
        if user is None:
            db.session.rollback()
            raise SignInRequired("the person no longer exists")
        return user

    def is_fresh(self, user: User) -> bool:
        expires_at = user.access_expires_at if self.kind == "access" else user.viewer_expires_at
        if self.ahead_of is not None:
            return expires_at != self.ahead_of  # replaced since the request saw it, or gone with a sign-out
        return not is_stale(expires_at) and (self.rejected is None or user.access_token != self.rejected)

    def check(self, user: User) -> None:
        """Stop before asking the provider what cannot succeed; settle a lost reply first."""
        if not user.refresh_token:
            db.session.rollback()
            raise SignInRequired("no refresh token stored")
        refused = _refused_lately(user, self.kind)
        if refused is not None:
            events.record(self, Outcome.STILL_REFUSED, cause=refused, write=False)
            raise ProviderRejected(refused)
        if user.refresh_unsure:
            self.settle_unsure(user)

    def ask(self, user: User) -> TokenResponse | None:
        """Refresh at the provider; None when a sign-in elsewhere replaced the grant (go round again)."""
        used, asked = user.refresh_token, time.monotonic()
        try:
            return current_app.extensions["provider"].refresh(used, scope=self.scope)
        except InvalidGrant:
            return self.refused_grant(user, used)
        except ProviderRejected as exc:
            self.finish(Outcome.REFUSED, cause=exc.error, reason=str(exc))
            raise
        except ProviderUnavailable as exc:
            if exc.delivered:
                user.refresh_unsure = True  # kept when introspection cannot tell
                self.settle_unsure(user)
            self.finish(Outcome.UNAVAILABLE, reason=str(exc))
            raise
        finally:
            self.provider_ms = round((time.monotonic() - asked) * 1000, 1)

    def refused_grant(self, user: User, used: str) -> None:
        """Tell a grant a sign-in elsewhere just replaced (return: go round again) from a dead one (forget it)."""
        if not user.refresh_unsure and grants.replaced_by_sign_in(self.user_id, used):
            return None
        self.holds_turn = False
        user = grants.lock(self.user_id)
        if user is None or user.refresh_token != used:
            db.session.commit()
            return None  # a newer grant arrived after all (or none is left, which the next round tells)
        # A replay after a lost reply (no introspection to ask first) is a lost rotation, not an expiry.
        self.end_grant(user, Outcome.LOST_ROTATION if user.refresh_unsure else Outcome.INVALID_GRANT)

    def settle_unsure(self, user: User) -> None:
        """Find out whether a refresh whose reply was lost rotated the kept token; a rotation we never stored is lost."""
        try:
            active = current_app.extensions["provider"].introspect(user.refresh_token).get("active")
        except ProviderError:
            return  # no introspection, or no answer: stay unsure, the refresh will tell
        if active is False and current_app.extensions.get(INTROSPECTS_REFRESH_TOKENS):
            self.end_grant(user, Outcome.LOST_ROTATION)
        if active is True:
            user.refresh_unsure = False
        # Otherwise stay unsure: the refresh itself will tell (a spent token gets invalid_grant: lost_rotation).

    def store(self, user: User, reply: TokenResponse) -> User:
        """Store the rotation with its event, and commit; retry on a fresh connection when the commit fails."""
        if self.kind == "access" and downscope.narrowed_grant(reply.scope):
            downscope.note_narrowed_grant(self.user_id, reply.scope, reply.refresh_token)
            self.end_grant(user, Outcome.GRANT_NARROWED, notice=downscope.NOTICE)
        used = user.refresh_token
        grants.store_rotation(user, self.kind, reply, self.scope)
        try:
            self.finish(Outcome.REFRESHED)
        except SQLAlchemyError as exc:
            db.session.rollback()
            return self.store_again(used, reply, exc)
        return user

    def store_again(self, used: str, reply: TokenResponse, failure: Exception) -> User:
        """Retry the rotation's commit, without its event, on fresh connections for ROTATION_STORE_RETRY seconds."""
        self.holds_turn = False
        deadline = time.monotonic() + current_app.config["ROTATION_STORE_RETRY"]
        pause = 0.05
        while time.monotonic() + pause <= deadline:
            # Never the statement's parameters: they hold tokens.
            log.warning(json.dumps({"event": "rotation_store_retry", "user_id": self.user_id, "reason": type(failure.__cause__ or failure).__name__}))
            time.sleep(pause)
            pause = min(pause * 2, 1.0)
            try:
                user = grants.lock(self.user_id)
                if user is None or user.refresh_token != used:
                    # A sign-in stored a newer grant (or the grant ended) meanwhile: ours is already dead.
                    db.session.commit()
                    if user is None or not user.refresh_token:
                        raise SignInRequired("the grant ended while its rotation was being stored")
                    return user
                grants.store_rotation(user, self.kind, reply, self.scope)
                db.session.commit()
            except (SQLAlchemyError, locking.LockTimeout) as exc:
                db.session.rollback()
                failure = exc
                continue
            self.finish(Outcome.REFRESHED)
            return user
        events.record(self, Outcome.LOST_ROTATION, reason=type(failure.__cause__ or failure).__name__, write=False)
        raise failure

    def end_grant(self, user: User, outcome: Outcome, notice: str | None = None) -> None:
        """Forget a dead grant and end every session that relied on it -> SignInRequired."""
        grants.forget(user)
        self.finish(outcome)
        raise SignInRequired(f"the grant ended: {outcome.value}", notice=notice)

    def finish(self, outcome: Outcome, cause: str | None = None, reason: str = "") -> None:
        """Record the outcome and commit with it, letting go of the locks."""
        events.record(self, outcome, cause=cause, reason=reason)
        self.holds_turn = False
