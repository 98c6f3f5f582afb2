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
from provider import InvalidGrant, ProviderError, ProviderRejected

T = TypeVar("T")


def call_with_access_token(user: User, call: Callable[[str], T], trigger: str) -> T:
    """Run call(access_token); on a 401, refresh once under the person's lock and retry once."""
    try:
        return _answer(call, user.access_token)
    except InvalidGrant:
        user = tokens.ensure_fresh_access_token(user, trigger=trigger, rejected=user.access_token)
    user_id = user.id
    try:
        return _answer(call, user.access_token)
    except InvalidGrant:
        # Even a fresh token is refused: the grant is no use any more, so forget it for every session.
        tokens.revoke(tokens.end_grant(user_id, "token_rejected", trigger=trigger))
        raise tokens.SignInRequired("the resource server rejects a fresh access token") from None


def _answer(call: Callable[[str], T], access_token: str) -> T:
    """Run the call, turning the provider's answers into what the app's error handlers show."""
    try:
        return call(access_token)
    except InvalidGrant:
        raise
    except ProviderRejected as exc:
        # 403 insufficient_scope and the like: an answer about this token, not an outage.
        raise tokens.RefreshRefused(exc.error) from None
    except ProviderError as exc:
        raise tokens.RefreshUnavailable(str(exc)) from None
