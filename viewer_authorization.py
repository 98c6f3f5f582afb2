"""The viewer's token from an authorization of its own (OAUTH_VIEWER_TOKEN=authorize), apart from the person's grant.

Some providers (django-oauth-toolkit) narrow the whole grant when a refresh asks for a narrower
scope, so the viewer's token cannot come from a narrowed refresh there. Instead the browser goes
through the provider once more, silently (prompt=none), for just OAUTH_VIEWER_SCOPE (and openid
when sign-in asks for it: OpenID providers honour prompt=none only in an OpenID request, and the ID
token names the person). The code it brings back is exchanged for an access token that is stored as
the viewer's: the person's refresh and access tokens are never touched. A provider may issue a
refresh token with it anyway; that one is never used, only kept (encrypted) to be revoked when the
next viewer authorization replaces it and at sign-out. So there is nothing to rotate and nothing to
lose; when the viewer's token runs out, the browser goes through the provider again (GET
/auth/viewer, auth.py).

This must never run where a second authorization ends the first: APS keeps one refresh token per
person per app. config.py refuses it with OAUTH_PROVIDER=autodesk or any issuer on autodesk.com,
and with the stand-in unless it keeps a grant per authorization.
"""

import json
import logging

import jwt
from flask import current_app

import downscope
import events
import grants
import tokens
from events import Outcome
from locking import LockTimeout
from models import User, db
from provider import ProviderError, ProviderUnavailable, TokenResponse, subject_of

log = logging.getLogger("tokens")

# Seconds of clock difference allowed when reading the ID token's expiry.
CLOCK_SKEW = 60


class AuthorizationNeeded(Exception):
    """The viewer's token is missing or stale: the browser must go through the provider again (GET /auth/viewer)."""


class Refused(Exception):
    """The provider's answer cannot become the viewer's token; what it brought is revoked as far as is safe, the person's grant untouched."""


class SignedOut(Refused):
    """The person signed out (everywhere) while the provider answered: there is nobody to store the token for."""


class NotThePerson(Refused):
    """The provider answered for another person than the one signed in here (another person's provider session)."""


class PersonUnknown(Refused):
    """The provider's answer does not say for whom it is: no usable ID token, nor a subject from introspection."""


class ScopeTooWide(Refused):
    """The provider granted more than the viewer's scope: the browser must never hold such a token."""


def enabled() -> bool:
    """Tell whether the viewer's token comes from an authorization of its own and the viewer token is on."""
    return downscope.by_authorization() and bool(current_app.config["OAUTH_VIEWER_SCOPE"].strip())


def scope() -> str:
    """Return the scope the viewer's authorization asks for: the viewer scope, with openid when sign-in asks for it."""
    config = current_app.config
    asked = config["OAUTH_VIEWER_SCOPE"].split()
    if "openid" in config["OAUTH_SCOPES"].split() and "openid" not in asked:
        asked.insert(0, "openid")
    return " ".join(asked)


def token(user: User) -> tokens.ViewerToken:
    """Return the viewer's stored token; AuthorizationNeeded when there is none that outlives the leeway."""
    if user.viewer_token is None or tokens.is_stale(user.viewer_expires_at):
        raise AuthorizationNeeded()
    return tokens.ViewerToken(user.viewer_token, user.viewer_expires_at, user.viewer_scope or "")


def store(user_id: int, code: str, redirect_uri: str, flow: dict, trigger: str) -> None:
    """Exchange the viewer authorization's code, check it is the signed-in person's, and store the access token as the viewer's.

    Raises Refused (why, by its kind), ProviderError when the provider fails or refuses, LockTimeout
    when the person's row stays locked; the person's grant is untouched in every case.
    """
    # An event like a refresh's, for the session page and the log; no refresh was asked, so none is timed as one (metrics).
    attempt = tokens.Attempt(user_id, "viewer", trigger)
    reply = current_app.extensions["provider"].exchange_code(code, redirect_uri, flow["verifier"])
    subject = user = None
    try:
        subject = _whose(reply, flow.get("nonce"))
        user = grants.lock(user_id)
        _check(user, subject, reply.scope)
    except (Refused, ProviderUnavailable, LockTimeout) as refusal:
        db.session.rollback()
        _discard(user_id, reply, subject, user, refusal)
        raise
    replaced = grants.store_viewer_token(user, reply, _granted(reply.scope))
    events.record(attempt, Outcome.AUTHORIZED)
    # Revoking a refresh token also revokes the access token issued with it at django-oauth-toolkit, so
    # the current one is kept, unused, until the next one replaces it (its access token is replaced too)
    # or the person signs out (grants.end_sessions revokes it with the rest); never left to outlive both.
    grants.revoke(replaced)


def _check(user: User | None, subject: str | None, granted: str | None) -> None:
    """Raise why the answer cannot be the locked person's viewer token, if it cannot."""
    if user is None or not user.refresh_token:
        raise SignedOut("the person signed out while the provider answered")
    if subject is None:
        raise PersonUnknown("the provider's answer does not say for whom it is")
    if subject != user.subject:
        raise NotThePerson("the provider answered for another person")
    if not set(_granted(granted).split()) <= set(scope().split()):
        raise ScopeTooWide("the provider granted more than the viewer's scope")


def _granted(granted: str | None) -> str:
    """Return the scope the reply grants: the one asked when it names none (RFC 6749 §5.1)."""
    return " ".join((granted or scope()).split())


def _discard(user_id: int, reply: TokenResponse, subject: str | None, user: User | None, refusal: Exception) -> None:
    """Log a refused answer and revoke what it brought: its access token always, its refresh token only when that is safe.

    Revoking a refresh token may end the whole grant it belongs to (RFC 7009 §2.1). Only a subject the
    provider confirmed says whose grant that is; and the person's own stored refresh token is never revoked here.
    """
    log.warning(json.dumps({"event": "viewer_authorization_refused", "user_id": user_id, "reason": type(refusal).__name__}))
    revocable = [(reply.access_token, "access_token")]
    if reply.refresh_token and subject is not None and user is not None and reply.refresh_token != user.refresh_token:
        revocable.append((reply.refresh_token, "refresh_token"))
    grants.revoke(revocable)


def _whose(reply: TokenResponse, nonce: str | None) -> str | None:
    """Return the subject the provider issued these tokens for: from the ID token, else from introspecting the access token.

    None when the answer does not say; ProviderUnavailable when introspection cannot be asked now.
    """
    if reply.id_token:
        return _id_token_subject(reply.id_token, nonce)
    try:
        about = current_app.extensions["provider"].introspect(reply.access_token)
    except ProviderUnavailable:
        raise
    except ProviderError:
        return None
    # RFC 7662 names it sub; APS's introspection (and the stand-in's) userid.
    subject = subject_of(about.get("sub") or about.get("userid"))
    return subject if about.get("active") is True and subject else None


def _id_token_subject(id_token: str, nonce: str | None) -> str | None:
    """Return the ID token's sub when it was issued by our provider, to us, for this request (its nonce), and has not expired.

    It came straight from the token endpoint, so TLS vouches for its origin (OpenID Connect Core
    §3.1.3.7): the claims are checked, the signature is not.
    """
    provider = current_app.extensions["provider"]
    options = {"verify_signature": False, "verify_exp": True, "verify_aud": True, "require": ["sub", "iss", "aud", "exp"]}
    try:
        claims = jwt.decode(id_token, options=options, audience=provider.client_id, leeway=CLOCK_SKEW)
    except jwt.PyJWTError:
        return None
    if not provider.is_issuer(claims["iss"]):
        return None
    if nonce is not None and claims.get("nonce") != nonce:
        return None
    subject = claims["sub"]
    return subject if isinstance(subject, str) and subject else None
