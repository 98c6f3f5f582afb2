"""The viewer's token from an authorization of its own (OAUTH_VIEWER_TOKEN=authorize), apart from the person's grant.

Some providers (django-oauth-toolkit) narrow the whole grant when a refresh asks for a narrower
scope, so the viewer's token cannot come from a narrowed refresh there. Instead the browser goes
through the provider once more, silently (prompt=none), for just OAUTH_VIEWER_SCOPE (and openid
when sign-in asks for it: OpenID providers honour prompt=none only in an OpenID request, and the ID
token names the person). The code it brings back is exchanged for an access token that is stored as
the viewer's, and for nothing else: the person's refresh and access tokens are never touched, and
no refresh token is kept for the viewer (a provider may issue one anyway; it is dropped unused, and
not revoked, since some providers revoke the access token issued with it). So there is nothing to
rotate and nothing to lose; when the viewer's token runs out, the browser goes through the provider
again (GET /auth/viewer, auth.py).

This must never run where a second authorization ends the first: APS keeps one refresh token per
person per app. config.py refuses it with OAUTH_PROVIDER=autodesk, and with the stand-in unless it
keeps a grant per authorization.
"""

import jwt
from flask import current_app

import downscope
import events
import grants
import tokens
from events import Outcome
from models import User, db
from provider import ProviderError, TokenResponse

# Seconds of clock difference allowed when reading the ID token's expiry.
CLOCK_SKEW = 60


class AuthorizationNeeded(Exception):
    """The viewer's token is missing or stale: the browser must go through the provider again (GET /auth/viewer)."""


class NotThePerson(Exception):
    """The provider's answer is not for the person signed in here (another person's provider session), or does not say whose it is."""


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

    Raises NotThePerson for an answer about someone else, ProviderError when the provider fails or
    refuses; the person's grant is untouched in every case.
    """
    # An event like a refresh's, for the session page and the log; no refresh was asked, so none is timed as one (metrics).
    attempt = tokens.Attempt(user_id, "viewer", trigger)
    reply = current_app.extensions["provider"].exchange_code(code, redirect_uri, flow["verifier"])
    subject = _whose(reply, flow.get("nonce"))
    user = grants.lock(user_id)
    signed_in = user is not None and bool(user.refresh_token)
    if not signed_in or subject != user.subject:
        db.session.rollback()
        # Nobody here will use them: revoke the grant this authorization made, whoever's it is.
        grants.revoke([(reply.access_token, "access_token")] + ([(reply.refresh_token, "refresh_token")] if reply.refresh_token else []))
        if signed_in:
            raise NotThePerson("the provider answered for another person, or did not say for whom")
        return  # signed out meanwhile: the page the browser goes to next says so
    grants.store_viewer_token(user, reply, scope())
    events.record(attempt, Outcome.AUTHORIZED)


def _whose(reply: TokenResponse, nonce: str | None) -> str | None:
    """Return the subject the provider issued these tokens for: from the ID token, else from introspecting the access token."""
    if reply.id_token:
        return _id_token_subject(reply.id_token, nonce)
    try:
        about = current_app.extensions["provider"].introspect(reply.access_token)
    except ProviderError:
        return None
    # RFC 7662 names it sub; APS's introspection (and the stand-in's) userid.
    subject = about.get("sub") or about.get("userid")
    return str(subject) if about.get("active") is True and isinstance(subject, str | int) else None


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
    if str(claims["iss"]).rstrip("/") != provider.endpoints.issuer.rstrip("/"):
        return None
    if nonce is not None and claims.get("nonce") != nonce:
        return None
    subject = claims["sub"]
    return subject if isinstance(subject, str) else None
