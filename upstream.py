"""The provider's API host behind GET /api/aps/<path>: where it is, and which paths may go to it.

Only paths on the allow-list (APS_PROXY_PATHS) leave this server, checked segment by segment on
the address as the client sent it, before any decoding a server might do differently: a dot
segment, an encoded slash or backslash, or a doubly encoded character is refused, not passed on.
The query string goes through with its encoding as it came.
"""

import re
from urllib.parse import quote, quote_from_bytes, unquote

from flask import current_app, request

PREFIX = "/api/aps/"
# What a decoded path segment may hold: APS ids are like b.1a2b-3c or urn:adsk.wipprod:fs.folder:co.Ab_9.
SEGMENT = re.compile(r"[A-Za-z0-9._:~-]+")


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
