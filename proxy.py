"""Forward the browser's GET /api/aps/<path> to the provider's API host, with the person's access token attached.

Only allow-listed paths leave this server (upstream.py says which). The answer comes back with its status,
JSON body and a few harmless headers, never the upstream's cookies or authentication headers, and
only if it arrives whole within APS_PROXY_TIMEOUT seconds and APS_PROXY_MAX_BYTES bytes.
"""

import json
import time
from dataclasses import dataclass

import requests
from flask import Blueprint, Response, abort, current_app, g, jsonify, request

import bearer
import upstream
from provider import InvalidGrant

bp = Blueprint("proxy", __name__)

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


@bp.get(f"{upstream.PREFIX}<path:path>")
def forward(path: str) -> Response:
    """Answer with the API host's answer to the same GET, if its path is on the allow-list."""
    base = upstream.api_base()
    target = upstream.allowed_target()
    if base is None or target is None:
        abort(404, "This API path is not forwarded.")
    if g.user is None:
        abort(401)
    url = f"{base}/{target}"
    try:
        answer = bearer.call_with_access_token(g.account(), lambda token: fetch(url, token), trigger=f"GET {request.path}")
    except UpstreamFailed as exc:
        return jsonify(error=exc.error, message=exc.message), exc.status
    response = Response(answer.body, status=answer.status, content_type=answer.content_type)
    response.headers.update(answer.headers)
    return response


def fetch(url: str, access_token: str) -> Answer:
    """GET url with the token; read the answer within the time and size bounds. A 401 raises InvalidGrant."""
    config = current_app.config
    limit, timeout = config["APS_PROXY_MAX_BYTES"], config["APS_PROXY_TIMEOUT"]
    deadline = time.monotonic() + timeout
    http = current_app.extensions["provider"].http
    headers = {"Authorization": f"Bearer {access_token}", "Accept": "application/vnd.api+json, application/json"}
    try:
        reply = http.get(url, headers=headers, timeout=(min(timeout, config["PROVIDER_TIMEOUT"]), timeout), stream=True, allow_redirects=False)
        with reply:
            if reply.status_code == 401:
                raise InvalidGrant("the API host refused the access token")
            declared = reply.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > limit:
                raise _too_large(limit)
            body = bytearray()
            for chunk in reply.iter_content(READ_CHUNK):
                body += chunk
                if len(body) > limit:
                    raise _too_large(limit)
                if time.monotonic() > deadline:
                    raise _too_slow(timeout)
    except requests.Timeout:
        raise _too_slow(timeout) from None
    except requests.RequestException as exc:
        raise UpstreamFailed(502, "upstream_unavailable", f"The API host could not be reached ({type(exc).__name__}).") from None
    if time.monotonic() > deadline:
        raise _too_slow(timeout)
    return _answer(reply, bytes(body))


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
