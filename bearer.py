"""Calls that carry the person's access token to a resource server: the provider's userinfo, its API (proxy.py).

An access token can die before its expiry: revoked by a sign-out elsewhere, or killed by a provider
that revokes the previous access token at every rotation. Every such call goes through
call_with_access_token, so a 401 anywhere gets the same answer: refresh once under the person's lock
(a waiter re-reads and finds the token its predecessor stored), then retry once.
"""

from collections.abc import Callable
from typing import TypeVar

import tokens
from models import User
from provider import InvalidGrant

T = TypeVar("T")


def call_with_access_token(user: User, call: Callable[[str], T], trigger: str) -> T:
    """Run call(access_token); on a 401, refresh once under the person's lock and retry once."""
    try:
        return call(user.access_token)
    except InvalidGrant:
        user = tokens.ensure_fresh_access_token(user, trigger=trigger, rejected=user.access_token)
    try:
        return call(user.access_token)
    except InvalidGrant:
        # Even a fresh token is refused: the grant is no use any more, so forget it for every session.
        tokens.end_rejected_grant(user.id, trigger=trigger)
