"""Defend every state-changing request against cross-site forgery.

Two independent checks: the browser's own word on where the request came from (Fetch
Metadata and Origin), and a token tied to the session that only our pages carry.
"""

import hashlib
import hmac
from urllib.parse import urlsplit

from flask import abort, current_app, g, request

SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


def token() -> str:
    """Return the CSRF token of the current session (empty when signed out)."""
    if g.get("session") is None:
        return ""
    key = current_app.config["SECRET_KEY"].encode()
    return hmac.new(key, f"csrf:{g.session.id_hash}".encode(), hashlib.sha256).hexdigest()


def protect() -> None:
    """Abort with 403 unless an unsafe request comes from our own pages."""
    if request.method in SAFE_METHODS:
        return
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        abort(403, "Cross-site request refused.")
    origin = request.headers.get("Origin")
    if origin is not None and urlsplit(origin).netloc != request.host:
        abort(403, "Cross-origin request refused.")
    if g.get("session") is None:
        return  # nothing to act on: the handlers treat a signed-out POST as a no-op
    sent = request.form.get("csrf_token") or request.headers.get("X-CSRF-Token") or ""
    if not hmac.compare_digest(sent, token()):
        abort(403, "The form expired or did not come from this site; reload the page and try again.")
