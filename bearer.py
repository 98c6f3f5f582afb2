"""Calls that carry the person's access token to a resource server: the provider's userinfo, its API (proxy.py).

An access token can die before its expiry: revoked by a sign-out elsewhere, or killed by a provider
that revokes the previous access token at every rotation. Every such call goes through
call_with_access_token, so a 401 anywhere gets the same answer: refresh once under the person's lock
(a waiter re-reads and finds the token its predecessor stored), then retry once.

A 401 to the token just refreshed is the resource server's answer about this request, passed to the
caller as a refusal (403): only the token endpoint can say that a grant died. Otherwise an API that
answers 401 for an id anyone may choose would sign the person out everywhere.
"""

from collections.abc import Callable
from typing import TypeVar

import downscope
import tokens
from models import User
from provider import InvalidGrant, TokenRefused

T = TypeVar("T")


def call_with_access_token(user: User, call: Callable[[str], T], trigger: str) -> T:
    """Run call(access_token); on a 401, refresh once under the person's lock and retry once."""
    try:
        return _call(user, call, trigger)
    except InvalidGrant:
        user = tokens.ensure_fresh_access_token(user, trigger=trigger, rejected=user.access_token)
    try:
        return _call(user, call, trigger)
    except InvalidGrant:
        tokens.note_rejected_token(user.id, trigger=trigger)
        raise TokenRefused("invalid_token", "the resource server refused a freshly renewed access token") from None


def _call(user: User, call: Callable[[str], T], trigger: str) -> T:
    """Run call(access_token); a refusal for want of scope right after a narrowed refresh ends the narrowed grant."""
    try:
        return call(user.access_token)
    except TokenRefused as exc:
        if exc.error == "insufficient_scope" and downscope.narrowed_quietly(user):
            tokens.end_narrowed_grant(user.id, trigger=trigger)
        raise
