"""JSON for scripts and the browser: who is signed in, a proof of a working token, health."""

from datetime import UTC, datetime

from flask import Blueprint, abort, current_app, g, jsonify, request, url_for

import bearer
import csrf
import downscope
import events
import grants
import policy
import tokens
import viewer_authorization
from models import utcnow
from sessions import Person

bp = Blueprint("api", __name__)


@bp.get("/healthz")
@policy.no_session
def healthz():
    return jsonify(status="ok")


@bp.get("/api/session")
@policy.passive
def session():
    """Describe the sign-in for a front end: who, how fresh, and how to sign out; never a token.

    Reading it does not keep the session alive (policy.passive): no last-seen write, no
    refresh, no cookie renewal. A page may poll it; the session still ends when the person is gone.
    """
    user = _signed_in()
    at, outcome = user.last_refresh_at, user.last_refresh_outcome  # the latest access refresh, read by the hook
    # An attempt from before the latest sign-in says nothing about the grant in use now.
    if at is None or (user.signed_in_at and at < user.signed_in_at):
        at = outcome = None
    expires_at = user.access_expires_at
    return jsonify(
        signed_in=True,
        user={"id": user.id, "name": user.name, "email": user.email},
        access_token_expires_at=_iso(expires_at),
        access_token_fresh=not tokens.is_stale(expires_at),
        access_token_refreshed_at=_iso(_refreshed_at(user, at, outcome)),
        last_refresh=None if at is None else {"at": _iso(at), "outcome": outcome},
        last_refresh_failed=at is not None and outcome != events.Outcome.REFRESHED,
        session_expires_at=_iso(g.session.expires_at),
        sign_out_url=url_for("auth.logout"),
        csrf_token=csrf.token(),
    )


def _refreshed_at(user, at: datetime | None, outcome: str | None) -> datetime | None:
    """Return when the access token in use was issued, from the latest attempt when that one succeeded (no query)."""
    if at is None:
        return user.signed_in_at  # no refresh since the sign-in, which issued it
    if outcome == events.Outcome.REFRESHED:
        return at
    return events.last_issued(user, "access")  # the latest attempt failed: look further back


@bp.get("/api/profile")
def profile():
    """Call the provider's userinfo with the person's access token, proving the backend holds a working one."""
    _signed_in()
    userinfo = current_app.extensions["provider"].userinfo
    return jsonify(bearer.call_with_access_token(g.account(), userinfo, trigger=f"{request.method} {request.path}"))


@bp.get("/api/viewer-token")
def viewer_token():
    """Hand the browser's viewer a token narrowed to OAUTH_VIEWER_SCOPE, never the full-scope one."""
    user = _signed_in()
    if downscope.viewer_scope(user) is None:
        message = "This app hands out no viewer token: OAUTH_VIEWER_SCOPE is empty, or the provider narrows the whole grant when asked for one."
        return jsonify(error="viewer_token_off", message=message), 404
    try:
        token = _viewer_token()
    except viewer_authorization.AuthorizationNeeded:
        message = "The viewer's token comes from an authorization of its own at the provider: send the browser to authorize_url (with ?next=) for a new one."
        return jsonify(error="viewer_authorization_needed", message=message, authorize_url=url_for("auth.viewer")), 401
    grants.hand_out(g.account(), g.session.id_hash, token.access_token, token.expires_at)
    expires_in = max(0, int((token.expires_at - utcnow()).total_seconds()))
    return jsonify(access_token=token.access_token, expires_in=expires_in, scope=token.scope)


def _viewer_token() -> tokens.ViewerToken:
    """Return the viewer's token: the stored one from its own authorization, or one from a narrowed refresh of the person's grant."""
    if viewer_authorization.enabled():
        return viewer_authorization.token(g.account())
    return tokens.viewer_token(g.account(), trigger=f"{request.method} {request.path}")


def _signed_in() -> Person:
    if g.user is None:
        abort(401)
    return g.user


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # a bare column read on SQLite loses the zone
    return moment.isoformat()
