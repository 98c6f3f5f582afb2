"""Defend against cross-site request forgery and cross-site reads.

Two independent checks on every state-changing request that carries a session (policy.py: all but
the provider's signed server-to-server calls): the browser's own word on where it
came from (Fetch Metadata and Origin), and a token tied to the session that only our pages
carry. Cross-site requests other than top-level navigations are refused outright, so another
site cannot even make the browser fetch a page or the viewer token with its cookies.
"""

import hashlib
import hmac

from flask import abort, current_app, g, request

SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


def token() -> str:
    """Return the CSRF token of the current session (empty when signed out)."""
    if g.session is None:
        return ""
    key = current_app.config["SECRET_KEY"].encode()
    return hmac.new(key, f"csrf:{g.session.id_hash}".encode(), hashlib.sha256).hexdigest()


def protect() -> None:
    """Abort with 403 unless an unsafe request comes from our own pages."""
    if request.routing_exception is not None:
        return  # no route takes it (404/405): it changes nothing, and the true answer is clearer
    site = request.headers.get("Sec-Fetch-Site")
    if request.method in SAFE_METHODS:
        # A link from another site (or the provider's redirect back) is a navigation; an
        # image, script, frame or fetch from another site is not, and gets nothing. The JSON
        # API is for our own pages and scripts: no other site may even link to it.
        if site == "cross-site" and (not _is_navigation() or request.path.startswith("/api/")):
            abort(403, "Cross-site request refused.")
        return
    if site is not None and site not in ("same-origin", "none"):
        abort(403, "Cross-site request refused.")
    origin = request.headers.get("Origin")
    # Under our Referrer-Policy: no-referrer, browsers send "Origin: null" even on same-origin form
    # posts (Fetch spec); there the browser's own Sec-Fetch-Site: same-origin vouches instead.
    vouched = origin == "null" and site == "same-origin"
    if origin is not None and origin.lower() != _own_origin().lower() and not vouched:
        abort(403, "Cross-origin request refused.")
    if g.session is None:
        return  # nothing to act on: the handlers treat a signed-out POST as a no-op
    sent = request.form.get("csrf_token") or request.headers.get("X-CSRF-Token") or ""
    # Bytes: compare_digest refuses non-ASCII str, and a forged form may send anything.
    if not hmac.compare_digest(sent.encode(), token().encode()):
        abort(403, "The form expired or did not come from this site; reload the page and try again.")


def _is_navigation() -> bool:
    mode = request.headers.get("Sec-Fetch-Mode", "navigate")
    dest = request.headers.get("Sec-Fetch-Dest", "document")
    return request.method in ("GET", "HEAD") and mode == "navigate" and dest == "document"


def _own_origin() -> str:
    # With Secure cookies the site is served over HTTPS, even when a TLS proxy talks plain HTTP to us.
    scheme = "https" if current_app.config["SESSION_COOKIE_SECURE"] else request.scheme
    return f"{scheme}://{request.host}"
