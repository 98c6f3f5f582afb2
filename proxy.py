"""Forward the browser's GET /api/aps/<path> to the provider's API host, with the person's access token attached.

Only paths on the allow-list (APS_PROXY_PATHS) leave this server, checked segment by segment on
the address as the client sent it, before any decoding a server might do differently: a dot
segment, an encoded slash or backslash, or a doubly encoded character is refused, not passed on.
The query string goes through with its encoding as it came. The answer comes back with its status,
JSON body and a few harmless headers, never the upstream's cookies or authentication headers, and
only if it arrives whole within APS_PROXY_TIMEOUT seconds and APS_PROXY_MAX_BYTES bytes. No cookie
goes to the API host: the proxy keeps none.
"""

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.cookiejar import DefaultCookiePolicy
from urllib.parse import quote, quote_from_bytes, unquote

import requests
import urllib3
from flask import Blueprint, Response, abort, current_app, g, jsonify, request

import bearer
import metrics
from provider import InvalidGrant

bp = Blueprint("proxy", __name__)
bp.after_request(metrics.count_proxy_response)  # every answer, the error pages and refusals too

PREFIX = "/api/aps/"
# What a decoded path segment may hold: APS ids are like b.1a2b-3c or urn:adsk.wipprod:fs.folder:co.Ab_9.
SEGMENT = re.compile(r"[A-Za-z0-9._:~-]+")
# Upstream headers a browser may see; cookies, authentication challenges and the rest stay here.
SAFE_HEADERS = ("ETag", "Last-Modified", "Retry-After")
JSON_TYPES = ("application/json", "application/vnd.api+json")
READ_CHUNK = 64 * 1024


class UpstreamFailed(Exception):
    """The API host did not give a usable answer: 502 (or 504 when it was too slow); the sign-in stands."""

    def __init__(self, status: int, error: str, message: str):
        super().__init__(message)
        self.status, self.error, self.message = status, error, message


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    content_type: str
    headers: dict[str, str]


@bp.get("/api/aps/<path:path>")
def forward(path: str) -> Response:
    """Answer with the API host's answer to the same GET, if its path is on the allow-list."""
    base = api_base()
    target = allowed_target()
    if base is None or target is None:
        abort(404, "This API path is not forwarded.")
    if g.get("user") is None:
        abort(401)
    url = f"{base}/{target}"
    try:
        answer = bearer.call_with_access_token(g.user, lambda token: fetch(url, token), trigger=f"GET {request.path}")
    except UpstreamFailed as exc:
        return jsonify(error=exc.error, message=exc.message), exc.status
    response = Response(answer.body, status=answer.status, content_type=answer.content_type)
    response.headers.update(answer.headers)
    return response


def api_base() -> str | None:
    """Return the API host's base URL: APS_API_URL, else the APS (or stand-in) issuer; None for other providers."""
    config = current_app.config
    if config.get("APS_API_URL"):
        return config["APS_API_URL"]
    return config["OAUTH_ISSUER"].rstrip("/") if config["OAUTH_PROVIDER"] in ("standin", "autodesk") else None


def allowed_target() -> str | None:
    """Return the path and query to ask upstream, as the client wrote them, or None when not allowed."""
    raw = request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI")
    path = raw.partition("?")[0] if raw else quote(request.path)
    if not path.startswith("/"):
        path = "/" + path.split("://", 1)[-1].partition("/")[2]  # absolute-form request target
    if not path.startswith(PREFIX):
        return None
    segments = path[len(PREFIX) :].split("/")
    decoded = [unquote(s) for s in segments]
    if not all(SEGMENT.fullmatch(s) and s.strip(".") for s in decoded):
        return None  # empty, dot-only, encoded slash or backslash, double encoding, anything unusual
    if not any(_matches(template, decoded) for template in current_app.config["APS_PROXY_PATHS"]):
        return None
    # Reserved characters and existing escapes stay as sent; anything a URL may not hold is escaped.
    query = quote_from_bytes(request.query_string, safe="/?:@!$&'()*+,;=-._~%[]")
    return "/".join(segments) + (f"?{query}" if query else "")


def _matches(template: str, segments: list[str]) -> bool:
    parts = template.split("/")
    return len(parts) == len(segments) and all(p in ("*", s) for p, s in zip(parts, segments, strict=True))


def fetch(url: str, access_token: str) -> Answer:
    """GET url with the token; read the answer within the time and size bounds. A 401 raises InvalidGrant."""
    config = current_app.config
    limit, timeout = config["APS_PROXY_MAX_BYTES"], config["APS_PROXY_TIMEOUT"]
    deadline = time.monotonic() + timeout
    headers = {"Authorization": f"Bearer {access_token}", "Accept": "application/vnd.api+json, application/json"}
    try:
        reply = _http().get(url, headers=headers, timeout=(min(timeout, config["PROVIDER_TIMEOUT"]), timeout), stream=True, allow_redirects=False)
        with reply:
            if reply.status_code == 401:
                raise InvalidGrant("the API host refused the access token")
            declared = reply.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > limit:
                raise _too_large(limit)
            body = bytearray()
            for chunk in _chunks(reply, deadline):
                body += chunk
                if len(body) > limit:
                    raise _too_large(limit)
    except requests.Timeout:
        raise _too_slow(timeout) from None
    except requests.RequestException as exc:
        raise UpstreamFailed(502, "upstream_unavailable", f"The API host could not be reached ({type(exc).__name__}).") from None
    if time.monotonic() > deadline:
        raise _too_slow(timeout)
    return _answer(reply, bytes(body))


def _http() -> requests.Session:
    """Return the proxy's HTTP session: the provider's transports, with a cookie jar that keeps nothing.

    One session serves everyone: a cookie the API host set while answering one person would go
    with the next person's request.
    """
    http = current_app.extensions.get("proxy_http")
    if http is None:
        http = requests.Session()
        http.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
        for prefix, adapter in current_app.extensions["provider"].http.adapters.items():
            http.mount(prefix, adapter)  # the stand-in in process, the provider's back channel, the connection pools
        current_app.extensions["proxy_http"] = http
    return http


def _chunks(reply: requests.Response, deadline: float) -> Iterator[bytes]:
    """Yield the body as it arrives until the deadline: each receive may wait only for the time left.

    A read timeout alone bounds each wait, not the whole: a server sending a byte now and then
    would hold the answer open as long as it liked.
    """
    if reply.raw is None or reply.raw.connection is None:
        yield from reply.iter_content(READ_CHUNK)  # already all here (in-process transport, or an empty body)
        return
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise requests.ReadTimeout("the answer did not arrive whole in time")
        # The connection goes back to the pool once the body is read: never touch it after that.
        if reply.raw.connection is not None and reply.raw.connection.sock is not None:
            reply.raw.connection.sock.settimeout(left)
        try:
            chunk = reply.raw.read1(READ_CHUNK)
        except urllib3.exceptions.ReadTimeoutError:
            raise requests.ReadTimeout("the answer did not arrive whole in time") from None
        except urllib3.exceptions.HTTPError as exc:
            raise requests.ConnectionError(exc) from None
        if not chunk:
            return
        yield chunk


def _answer(reply: requests.Response, body: bytes) -> Answer:
    """Keep an answer the browser may have: a 2xx or 4xx with a JSON body (or none)."""
    status = reply.status_code
    if status >= 500 or 300 <= status < 400 or status < 200:
        raise UpstreamFailed(502, "upstream_error", f"The API host answered {status}; please try again in a moment.")
    content_type = reply.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if body:
        if content_type not in JSON_TYPES:
            raise UpstreamFailed(502, "upstream_not_json", "The API host answered with something other than JSON.")
        try:
            json.loads(body)
        except ValueError:
            raise UpstreamFailed(502, "upstream_not_json", "The API host answered with malformed JSON.") from None
    headers = {name: reply.headers[name] for name in SAFE_HEADERS if name in reply.headers}
    return Answer(status, body, content_type or "application/json", headers)


def _too_large(limit: int) -> UpstreamFailed:
    return UpstreamFailed(502, "upstream_too_large", f"The API host's answer is larger than {limit} bytes.")


def _too_slow(timeout: int) -> UpstreamFailed:
    return UpstreamFailed(504, "upstream_timeout", f"The API host did not answer within {timeout} seconds; you are still signed in.")
