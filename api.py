"""JSON for scripts and the browser: who is signed in, a proof of a working token, health."""

from flask import Blueprint, abort, current_app, g, jsonify, request

import bearer
import downscope
import tokens
from models import utcnow

bp = Blueprint("api", __name__)


@bp.get("/healthz")
def healthz():
    return jsonify(status="ok")


@bp.get("/api/session")
def session():
    user = _signed_in()
    return jsonify(
        signed_in=True,
        user={"id": user.id, "name": user.name, "email": user.email},
        access_token_expires_at=user.access_expires_at.isoformat(),
    )


@bp.get("/api/profile")
def profile():
    """Call the provider's userinfo with the person's access token, proving the backend holds a working one."""
    user = _signed_in()
    userinfo = current_app.extensions["provider"].userinfo
    return jsonify(bearer.call_with_access_token(user, userinfo, trigger=request.path))


@bp.get("/api/viewer-token")
def viewer_token():
    """Hand the browser's viewer a token narrowed to OAUTH_VIEWER_SCOPE, never the full-scope one."""
    user = _signed_in()
    if downscope.viewer_scope(user) is None:
        message = "This app hands out no viewer token: OAUTH_VIEWER_SCOPE is empty, or the provider narrows the whole grant when asked for one."
        return jsonify(error="viewer_token_off", message=message), 404
    token = tokens.viewer_token(user, trigger=request.path)
    expires_in = max(0, int((token.expires_at - utcnow()).total_seconds()))
    return jsonify(access_token=token.access_token, expires_in=expires_in, scope=token.scope)


def _signed_in():
    if g.get("user") is None:
        abort(401)
    return g.user
