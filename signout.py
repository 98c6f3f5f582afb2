"""Tell a browser that was signed out what happened, on this app's own page, and never sign it in again unasked."""

from flask import Flask, Response, current_app, g, render_template, request, url_for

import sessions
from redirects import safe_next

# What a browser's marker cookie may say, and the sentence each one stands for.
REASONS = {
    "here": "You signed out on this browser.",
    "everywhere": "You signed out everywhere: every device of yours is signed out, and this app let go of your tokens.",
    "elsewhere": "This browser was signed out from another of your devices, or at the sign-in provider.",
}


def init_app(app: Flask) -> None:
    app.after_request(_mark_ended)
    app.jinja_env.globals["signed_out_reason"] = reason


def _cookie() -> str:
    return "__Host-signed-out" if current_app.config["SESSION_COOKIE_SECURE"] else "signed-out"


def remember(response: Response, why: str) -> None:
    """Mark this browser as signed out on purpose: its pages say so instead of sending it to the provider."""
    # As long as an ended session's cookie may come back (sessions.RESUME_GRACE).
    max_age = int(sessions.RESUME_GRACE.total_seconds())
    response.set_cookie(_cookie(), why, max_age=max_age, **sessions.cookie_attributes())


def forget(response: Response) -> None:
    """Drop the mark: the person has asked to sign in again."""
    if request.cookies.get(_cookie()):
        response.delete_cookie(_cookie(), **sessions.cookie_attributes())


def reason() -> str | None:
    """Return why this signed-out browser is signed out, as a sentence, or None when it was never told."""
    if g.get("user") is not None:
        return None
    return REASONS.get(g.get("signed_out") or request.cookies.get(_cookie(), ""))


def page() -> tuple[str, int]:
    """Say that this browser is signed out and why, with one link through sign-in back to this page."""
    again = url_for("auth.login", next=safe_next(request.full_path.rstrip("?")))
    return render_template("signed_out.html", reason=reason(), again=again), 401


def _mark_ended(response: Response) -> Response:
    """Keep the mark the sign-in hook set for a session that a sign-out elsewhere ended."""
    if g.get("signed_out"):
        remember(response, g.signed_out)
    return response
