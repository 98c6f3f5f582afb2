"""What the sign-in hook and the request checks do for each view, declared on the view itself.

    @bp.get("/api/session")
    @policy.passive
    def session(): ...

A view without a declaration gets the default: the hook reads the session cookie, counts the
request as use (last seen, cookie renewal), refreshes a stale access token first, and a POST
needs the CSRF token (csrf.py). And one rule says how a request is answered: every /api/ route in JSON,
every other route with a page.
"""

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

from flask import current_app, request

View = TypeVar("View", bound=Callable)


@dataclass(frozen=True)
class Policy:
    reads_session: bool = True  # the hook looks at the session cookie at all
    keeps_alive: bool = True  # the request counts as use: last-seen, token refresh, cookie renewal
    refreshes: bool = True  # the view needs a live grant: a stale access token is refreshed first, a dead grant's page resumes through sign-in
    rate_limit: str | None = None  # the app extension (limits.py) that counts these requests per client address


DEFAULT = Policy()


def _declare(**changes) -> Callable[[View], View]:
    def declare(view: View) -> View:
        view.policy = replace(getattr(view, "policy", DEFAULT), **changes)
        return view

    return declare


# No session, no CSRF check: health checks, static files, and the provider's server-to-server calls (their signature authenticates them).
no_session = _declare(reads_session=False)
# Reads the session without keeping it alive, so a tab left polling it lets the session end.
passive = _declare(keeps_alive=False, refreshes=False)
# The sign-in and sign-out flow itself: it needs no live grant.
sign_in_flow = _declare(refreshes=False)


def rate_limited(limiter: str) -> Callable[[View], View]:
    """Count this view's requests per client address with the app's limiter of that name (limits.py)."""
    return _declare(rate_limit=limiter)


def current() -> Policy:
    """Return the policy of the view this request goes to (the default when no route takes it)."""
    view = current_app.view_functions.get(request.endpoint) if request.endpoint else None
    return getattr(view, "policy", DEFAULT)


def answers_json() -> bool:
    """Tell whether this request is answered in JSON, errors included: every /api/ route is, every other route is a page."""
    return request.path.startswith("/api/")
