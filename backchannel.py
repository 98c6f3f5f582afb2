"""OpenID Connect Back-Channel Logout 1.0: the provider tells this app, server to server, that a person signed out there.

The provider POSTs a logout token (a signed JWT) to /auth/backchannel-logout. It is checked as §2.6
of the spec says: signature against the provider's JWKS (from discovery), iss, aud, iat, the
back-channel logout event, sub and/or sid, no nonce, and a jti not seen before. Then the sessions it
names end: those with its sid (or, for a token with only sub, all of the person's), and with the
last of them the grant is forgotten and revoked, exactly as a sign-out here (tokens.end_sessions).
The request carries no cookie and no CSRF token: the provider's signature is what authenticates it.
"""

import hashlib
import logging
import threading
import time
import unicodedata
from datetime import UTC, datetime, timedelta

import jwt
import requests
from flask import Blueprint, Response, current_app, jsonify, request
from sqlalchemy import delete, or_, select
from sqlalchemy.exc import IntegrityError

import metrics
import tokens
from models import SeenLogoutToken, User, UserSession, db, utcnow

log = logging.getLogger("backchannel")
bp = Blueprint("backchannel", __name__)

EVENT = "http://schemas.openid.net/event/backchannel-logout"
# Signature algorithms with a public key: "none" and the HMAC ones (keyed with what, the client secret?) never.
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
# A logout token older than this is refused, so its jti needs remembering only this long.
MAX_AGE = timedelta(minutes=5)
CLOCK_SKEW = timedelta(seconds=60)
# A token signed with a key we do not know makes us fetch the JWKS again, at most this often (key rotation).
REFETCH_AFTER = 60.0
MAX_TOKEN_LENGTH = 16 * 1024
FAMILIES = {"RSA": ALGORITHMS[:6], "EC": ALGORITHMS[6:9], "OKP": ("EdDSA",)}


class InvalidLogoutToken(Exception):
    """The logout token fails one of the spec's checks; the message says which, for the provider's logs."""


class ProviderKeys:
    """The provider's public signing keys, fetched from its jwks_uri and fetched again when an unknown key id appears."""

    def __init__(self, url: str):
        self.url = url
        self.keys: list[jwt.PyJWK] = []
        self.fetched_at = float("-inf")
        self.lock = threading.Lock()

    def key_for(self, kid: str | None, alg: str) -> jwt.PyJWK:
        with self.lock:
            key = self._find(kid, alg)
            if key is None and time.monotonic() - self.fetched_at > REFETCH_AFTER:
                self._fetch()
                key = self._find(kid, alg)
        if key is None:
            raise InvalidLogoutToken("signed with a key the provider does not publish")
        return key

    def _find(self, kid: str | None, alg: str) -> jwt.PyJWK | None:
        fitting = [k for k in self.keys if alg in FAMILIES.get(k.key_type, ()) and (kid is None or k.key_id == kid)]
        # No kid: usable only when exactly one published key fits the algorithm.
        return fitting[0] if len(fitting) == 1 else None

    def _fetch(self) -> None:
        provider = current_app.extensions["provider"]
        self.fetched_at = time.monotonic()
        try:
            reply = provider.http.get(self.url, timeout=provider.timeout)
            reply.raise_for_status()
            keys = jwt.PyJWKSet.from_dict(reply.json())
        except (requests.RequestException, ValueError, jwt.PyJWKSetError) as exc:
            log.warning("could not read the provider's JWKS at %s: %s", self.url, type(exc).__name__)
            return
        # Signing keys only: a key published for encryption must not verify anything.
        self.keys = [k for k in keys.keys if k.public_key_use in (None, "sig")]


@bp.post("/auth/backchannel-logout")
def logout() -> tuple[Response, int] | Response:
    """End the sessions a valid logout token names; answer 200, or 400 with the reason (§2.8)."""
    endpoints = current_app.extensions["provider"].endpoints
    if current_app.config["OAUTH_PROVIDER"] != "oidc" or not endpoints.jwks:
        return _refuse("this app takes no back-channel logout from its provider")
    try:
        claims = validate(request.form.get("logout_token", ""), endpoints.issuer, endpoints.jwks)
        _remember(claims)
    except InvalidLogoutToken as exc:
        log.info("back-channel logout refused: %s", exc)
        return _refuse(str(exc))
    ended = end_sessions(claims.get("sub"), claims.get("sid"))
    metrics.count_sign_out("backchannel")
    log.info("back-channel logout ended %d session(s)", ended)
    return Response(status=200)


def validate(token: str, issuer: str, jwks_url: str) -> dict:
    """Return the claims of a logout token that passes every check of Back-Channel Logout 1.0 §2.6."""
    if not token or len(token) > MAX_TOKEN_LENGTH:
        raise InvalidLogoutToken("logout_token is missing or too long")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise InvalidLogoutToken("logout_token is not a JWT") from None
    alg = header.get("alg")
    if alg not in ALGORITHMS:
        raise InvalidLogoutToken(f"algorithm {alg!r} is not accepted")
    typ = header.get("typ")
    if typ is not None and str(typ).lower() not in ("logout+jwt", "application/logout+jwt", "jwt"):
        raise InvalidLogoutToken(f"a {typ!r} token is not a logout token")
    keys = current_app.extensions.setdefault("logout_keys", ProviderKeys(jwks_url))
    kid = header.get("kid")
    key = keys.key_for(kid if isinstance(kid, str) else None, alg)
    try:
        # The key itself, not the PyJWK, which would insist on one algorithm when the JWKS names none.
        claims = jwt.decode(
            token,
            key.key,
            algorithms=[alg],
            audience=current_app.config["OAUTH_CLIENT_ID"],
            issuer=issuer,
            leeway=CLOCK_SKEW,
            options={"require": ["iss", "aud", "iat", "jti"]},
        )
    except jwt.PyJWTError as exc:
        raise InvalidLogoutToken(f"the token does not verify ({type(exc).__name__})") from None
    events = claims.get("events")
    if not isinstance(events, dict) or not isinstance(events.get(EVENT), dict):
        raise InvalidLogoutToken("the token carries no back-channel logout event")
    if "nonce" in claims:
        raise InvalidLogoutToken("a logout token must not carry a nonce")
    sub, sid = claims.get("sub"), claims.get("sid")
    if not (_text(sub) or _text(sid)) or (sub is not None and not _text(sub)) or (sid is not None and not _text(sid)):
        raise InvalidLogoutToken("the token names no session (sub or sid)")
    if not _text(claims["jti"]):
        raise InvalidLogoutToken("jti must be a string")
    try:
        issued_at = _issued_at(claims)
    except (OverflowError, ValueError, OSError):
        raise InvalidLogoutToken("iat is not a time") from None
    if issued_at < utcnow() - MAX_AGE - CLOCK_SKEW:
        raise InvalidLogoutToken("the token is too old")
    return claims


def _text(value: object) -> bool:
    # PostgreSQL refuses NUL in text, and no encoding holds a lone surrogate (JSON's "\\ud800"): such a claim is a bad token.
    return isinstance(value, str) and 0 < len(value) <= 255 and not any(unicodedata.category(c) in ("Cc", "Cs") for c in value)


def _issued_at(claims: dict) -> datetime:
    return datetime.fromtimestamp(int(claims["iat"]), UTC)


def _remember(claims: dict) -> None:
    """Record the token's jti; one seen before is a replay. Forget those too old to be accepted anyway."""
    now = utcnow()
    db.session.execute(delete(SeenLogoutToken).where(SeenLogoutToken.expires_at < now))
    jti_hash = hashlib.sha256(f"{claims['iss']}\n{claims['jti']}".encode()).hexdigest()
    db.session.add(SeenLogoutToken(jti_hash=jti_hash, expires_at=_issued_at(claims) + MAX_AGE + 2 * CLOCK_SKEW))
    try:
        db.session.commit()
    except IntegrityError:
        db.session.rollback()
        raise InvalidLogoutToken("this logout token was already used") from None


def end_sessions(sub: str | None, sid: str | None) -> int:
    """End the sessions a logout token names, revoking the grant with the last of a person's; return how many ended.

    With a sid: that provider session's sessions, and the person's sessions whose sid we never learnt
    (their provider gave no sid in its ID token). With only sub: all of the person's sessions.
    """
    query = select(UserSession.user_id, UserSession.id_hash).join(UserSession.user)
    if sub is not None:
        query = query.where(User.subject == sub)
    if sid is not None and sub is not None:
        query = query.where(or_(UserSession.provider_sid == sid, UserSession.provider_sid.is_(None)))
    elif sid is not None:
        query = query.where(UserSession.provider_sid == sid)
    chosen: dict[int, set[str]] = {}
    for user_id, id_hash in db.session.execute(query):
        chosen.setdefault(user_id, set()).add(id_hash)
    db.session.commit()
    for user_id, id_hashes in chosen.items():
        tokens.revoke(tokens.end_sessions(user_id, None if sid is None else id_hashes))
    return sum(len(hashes) for hashes in chosen.values())


def _refuse(reason: str) -> tuple[Response, int]:
    return jsonify(error="invalid_request", error_description=reason), 400


def sid_of(id_token: str | None) -> str | None:
    """Read the sid claim of an ID token received straight from the token endpoint (OIDC Core §3.1.3.7 lets TLS vouch for it)."""
    if not id_token:
        return None
    try:
        sid = jwt.decode(id_token, options={"verify_signature": False}).get("sid")
    except jwt.PyJWTError:
        return None
    return sid if _text(sid) else None
