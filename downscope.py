"""Whether the provider may be asked for narrowed (viewer) tokens, and noticing one that narrows the whole grant.

A refresh that asks for a narrower scope should narrow only the access token it returns: the rotated
refresh token keeps the original scope (RFC 6749 §6), as APS does. Some providers narrow the new
refresh token too, so every later refresh comes back narrowed and the person's full-scope calls fail.
The app notices at the next full refresh (it comes back with nothing beyond the viewer scope), ends
that grant, stops downscoping at this provider and asks the person to sign in once more. The database
keeps the fact as a refresh event, so every worker and instance stops too. A provider that names no
scope in its replies is found out by a resource server instead: insufficient_scope to the token of the
first full refresh after a narrowed one (narrowed_quietly, bearer.py). With OAUTH_VIEWER_TOKEN=authorize
no narrowed refresh is asked for at all: the viewer's token comes from an authorization of its own.
"""

import contextlib
import logging
import time

from flask import current_app
from sqlalchemy import select

from events import Outcome
from models import RefreshEvent, User, db
from provider import ProviderError

log = logging.getLogger("tokens")

NOTICE = (
    "Your sign-in provider narrowed your whole sign-in when this app asked it for a token for the viewer, so your sign-in ended. "
    "This app no longer asks it for narrowed tokens: please sign in again, once."
)
# How long a worker trusts "no narrowing seen" before looking in the database again.
RECHECK_SECONDS = 60


def viewer_scope(user: User) -> str | None:
    """Return the scope to narrow the viewer token to, or None when the viewer token is off (OAUTH_VIEWER_SCOPE empty, or a narrowing provider).

    With OAUTH_VIEWER_TOKEN=authorize the viewer's token comes from an authorization of its own, which
    narrows no grant: a narrowing seen before does not turn it off.
    """
    scope = current_app.config["OAUTH_VIEWER_SCOPE"].strip()
    if not scope or (not by_authorization() and _narrowing_seen(user)):
        return None
    return scope


def by_authorization() -> bool:
    """Tell whether the viewer's token comes from an authorization of its own (viewer_authorization.py), never from a narrowed refresh."""
    return current_app.config["OAUTH_VIEWER_TOKEN"] == "authorize"


def narrowed_grant(granted: str | None) -> bool:
    """Tell whether a full refresh came back with nothing beyond the viewer scope, although sign-in asks for more."""
    if by_authorization():
        return False  # no narrowed refresh is ever asked for
    viewer = set(current_app.config["OAUTH_VIEWER_SCOPE"].split())
    asked = set(current_app.config["OAUTH_SCOPES"].split())
    if granted is None or not viewer or not asked - viewer:
        return False  # a provider that does not say what it granted cannot be judged, and is trusted
    return set(granted.split()) <= viewer


def narrowed_quietly(user: User) -> bool:
    """Tell whether the person's access token came from the first full refresh after a narrowed one since their sign-in.

    A provider that narrows the whole grant and names no scope in its reply cannot be caught at the
    refresh; a resource server's insufficient_scope to exactly this token gives it away.
    """
    if not current_app.config["OAUTH_VIEWER_SCOPE"].strip() or by_authorization():
        return False  # no narrowed refresh is ever asked for
    since = user.signed_in_at
    latest = {}
    for kind in ("viewer", "access"):
        query = select(RefreshEvent.at).where(RefreshEvent.user_id == user.id, RefreshEvent.kind == kind, RefreshEvent.outcome == Outcome.REFRESHED)
        latest[kind] = db.session.execute(query.order_by(RefreshEvent.id.desc()).limit(1)).scalar_one_or_none()
    viewer, access = latest["viewer"], latest["access"]
    return viewer is not None and access is not None and (since is None or viewer >= since) and access >= viewer


def note_narrowed_grant(user_id: int, granted: str | None, refresh_token: str | None) -> None:
    """Stop downscoping in this worker, say why in one line, and revoke the narrowed grant; the caller's refresh event tells the others."""
    current_app.extensions["grant_narrowing_seen"] = (True, time.monotonic())
    log.warning(
        "The provider narrowed a whole grant to %r after a narrowed refresh (user_id %d): "
        "no more viewer tokens from it; set OAUTH_VIEWER_SCOPE= to make that permanent.",
        granted or "a scope it did not name",
        user_id,
    )
    if refresh_token:
        with contextlib.suppress(ProviderError):  # best effort: nobody holds that token any more
            current_app.extensions["provider"].revoke(refresh_token)


def _narrowing_seen(user: User) -> bool:
    seen, checked = current_app.extensions.get("grant_narrowing_seen", (False, float("-inf")))
    if not seen and time.monotonic() - checked > RECHECK_SECONDS:
        seen = db.session.execute(select(RefreshEvent.id).where(RefreshEvent.outcome == Outcome.GRANT_NARROWED).limit(1)).first() is not None
        current_app.extensions["grant_narrowing_seen"] = (seen, time.monotonic())
    if not seen:
        # This person's own grant was narrowed: never again for them, even before the cache above expires.
        mine = select(RefreshEvent.id).where(RefreshEvent.user_id == user.id, RefreshEvent.outcome == Outcome.GRANT_NARROWED).limit(1)
        seen = db.session.execute(mine).first() is not None
    return seen
