"""Refuse requests that ask too often or too much, before they reach the database or the provider.

Sign-in and callback are limited per client address (SIGNIN_RATE_LIMIT, such as "20/minute"),
so one client cannot make us hammer the provider. The counters live in this process's memory:
with several workers or instances each keeps its own, so a client may get up to (workers x
limit) through. request.remote_addr must be the client's address, so behind a reverse proxy
the app must trust that proxy's X-Forwarded-For (werkzeug's ProxyFix); otherwise every client
shares the proxy's address and one limit.
"""

import json
import re
import threading
import time
from collections import deque
from collections.abc import Callable

from flask import Flask, Response, current_app, render_template, request
from werkzeug.exceptions import RequestEntityTooLarge, RequestHeaderFieldsTooLarge, RequestURITooLarge

import policy
from config import ConfigError

UNITS = {"second": 1, "minute": 60, "hour": 3600}
# About what gunicorn itself accepts (limit_request_line 4094, limit_request_field_size 8190),
# so the app answers the same with or without it in front.
MAX_QUERY_STRING = 4096
MAX_HEADER_VALUE = 8190
MAX_HEADERS_TOTAL = 32 * 1024
# Our forms carry a token and an id or two.
MAX_BODY = 64 * 1024


class RateLimiter:
    """Allow at most `limit` hits per `window` seconds for each key (sliding window, thread-safe); refuse(seconds) answers the others."""

    def __init__(self, limit: int, window: float, refuse: Callable[[int], Response] | None = None):
        self.limit, self.window, self.refuse = limit, window, refuse
        self.hits: dict[str, deque[float]] = {}
        self.lock = threading.Lock()
        self.checks = 0

    def hit(self, key: str) -> float:
        """Count a hit; return 0 if allowed, else the seconds until the next one would be."""
        now = time.monotonic()
        with self.lock:
            self.checks += 1
            if self.checks % 1000 == 0:
                self._forget_idle(now)
            hits = self.hits.setdefault(key, deque())
            while hits and hits[0] <= now - self.window:
                hits.popleft()
            if len(hits) >= self.limit:
                return hits[0] + self.window - now
            hits.append(now)
            return 0.0

    def _forget_idle(self, now: float) -> None:
        # Keep memory bounded by the clients of the last window.
        for key in [k for k, hits in self.hits.items() if not hits or hits[-1] <= now - self.window]:
            del self.hits[key]


def parse_rate(value: str | None, name: str = "SIGNIN_RATE_LIMIT") -> tuple[int, int] | None:
    """Read "20/minute" as (20, 60); "off" (or empty) as None."""
    text = (value or "").strip().lower()
    if text in ("", "off", "0", "none", "false"):
        return None
    match = re.fullmatch(r"(\d+)\s*/\s*(second|minute|hour)", text)
    if not match or int(match[1]) < 1:
        raise ConfigError(f"{name} must look like 20/minute (per second, minute or hour) or off, got {value!r}.")
    return int(match[1]), UNITS[match[2]]


def init_app(app: Flask) -> None:
    """Install the size checks and, unless switched off, the sign-in rate limit."""
    rate = parse_rate(app.config.get("SIGNIN_RATE_LIMIT", "20/minute"))
    app.extensions["signin_limiter"] = RateLimiter(*rate, refuse=_too_many_sign_ins) if rate else None
    logouts = parse_rate(app.config.get("BACKCHANNEL_LOGOUT_RATE_LIMIT", "60/minute"), "BACKCHANNEL_LOGOUT_RATE_LIMIT")
    app.extensions["backchannel_limiter"] = RateLimiter(*logouts, refuse=_too_many_logouts) if logouts else None
    if app.config.get("MAX_CONTENT_LENGTH") is None:  # Flask's default is no limit
        app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.before_request(check_size)
    app.before_request(check_rate)


def check_size() -> None:
    """Answer 413/414/431 for a body, query string or headers larger than any real client sends."""
    if request.content_length and request.content_length > current_app.config["MAX_CONTENT_LENGTH"]:
        raise RequestEntityTooLarge("The request is too large.")
    if len(request.query_string) > MAX_QUERY_STRING:
        raise RequestURITooLarge("The address is too long.")
    total = 0
    for name, value in request.headers.items():
        total += len(name) + len(value)
        if len(value) > MAX_HEADER_VALUE or total > MAX_HEADERS_TOTAL:
            raise RequestHeaderFieldsTooLarge("The request's headers (perhaps its cookies) are too large; clearing this site's cookies helps.")


def check_rate() -> Response | None:
    """Answer 429 when this client address has sent too many requests lately to a view its policy rate-limits."""
    name = policy.current().rate_limit
    limiter = current_app.extensions.get(name) if name else None
    wait = limiter.hit(f"{request.endpoint} {request.remote_addr or 'unknown'}") if limiter else 0
    if not wait:
        return None
    return limiter.refuse(max(1, round(wait)))


def _too_many_sign_ins(seconds: int) -> Response:
    detail = f"Too many sign-in attempts from your network. Please wait {seconds} seconds and try again."
    page = render_template("error.html", title="Too many sign-in attempts", detail=detail, retry=None)
    return Response(page, status=429, headers={"Retry-After": str(seconds)})


def _too_many_logouts(seconds: int) -> Response:
    """Answer the provider's logout requests beyond BACKCHANNEL_LOGOUT_RATE_LIMIT as its spec wants: JSON (each costs a signature check)."""
    body = {"error": "temporarily_unavailable", "error_description": "too many logout requests"}
    return Response(json.dumps(body), status=429, mimetype="application/json", headers={"Retry-After": str(seconds)})
