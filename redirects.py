"""Decide where it is safe to send a person after sign-in."""

from urllib.parse import unquote, urlsplit

MAX_NEXT_LENGTH = 512


def safe_next(value: str | None) -> str:
    """Return value if it is a path on this site, else "/".

    Rejects absolute and scheme-relative URLs, backslashes (browsers read them as slashes),
    control characters and encoded variants of all of these.
    """
    if not value or len(value) > MAX_NEXT_LENGTH:
        return "/"
    decoded = value
    for _ in range(3):  # catch double and triple encoding too
        decoded = unquote(decoded)
    for candidate in (value, decoded):
        if not candidate.startswith("/") or candidate.startswith("//") or "\\" in candidate:
            return "/"
        if any(ord(c) < 32 or ord(c) == 127 for c in candidate):
            return "/"
        parts = urlsplit(candidate)
        if parts.scheme or parts.netloc:
            return "/"
    return value
