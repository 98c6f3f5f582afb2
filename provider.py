"""Talk to the authorization server: authorize URL, code exchange, refresh, revoke, userinfo."""

import logging
import re
from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit

import jwt
import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import NewConnectionError

from config import APS_HOST, ConfigError

log = logging.getLogger("provider")


class ProviderError(Exception):
    """The provider did not give us what we asked for."""


class ProviderUnavailable(ProviderError):
    """The provider is unreachable, slow or failing (5xx, timeout, garbled reply): try again later.

    delivered: the request may have reached the provider and been acted on (the reply was lost
    or unreadable), so a refresh may have rotated the token we still hold.
    """

    def __init__(self, message: str, *, delivered: bool = False):
        super().__init__(message)
        self.delivered = delivered


class InvalidGrant(ProviderError):
    """The code or refresh token is dead: expired, used, revoked or replaced."""


class ProviderRejected(ProviderError):
    """The provider refused the request for another OAuth reason (invalid_scope, invalid_client...)."""

    def __init__(self, error: str, description: str = ""):
        super().__init__(f"{error}: {description}" if description else error)
        self.error = error


class TokenRefused(ProviderRejected):
    """A resource server refused the access token for this request (RFC 6750 §3.1: insufficient_scope, or invalid_token once renewed)."""


@dataclass(frozen=True)
class Endpoints:
    issuer: str
    authorize: str
    token: str
    userinfo: str
    revoke: str | None
    introspect: str | None
    logout: str | None
    # The provider's signing keys (OIDC discovery's jwks_uri): back-channel logout tokens are checked against them.
    jwks: str | None = None


@dataclass(frozen=True)
class TokenResponse:
    access_token: str
    expires_in: int
    refresh_token: str | None
    scope: str | None
    id_token: str | None = None

    @property
    def sid(self) -> str | None:
        """Return the ID token's sid, so the provider's back-channel logout can name this session (backchannel.py).

        The ID token came straight from the token endpoint: OIDC Core §3.1.3.7 lets TLS vouch for it.
        """
        if not self.id_token:
            return None
        try:
            sid = jwt.decode(self.id_token, options={"verify_signature": False}).get("sid")
        except jwt.PyJWTError:
            return None
        return sid if isinstance(sid, str) and 0 < len(sid) <= 255 else None


def aps_endpoints(issuer: str, userinfo: str | None = None) -> Endpoints:
    """Return the APS Authentication v2 endpoints under issuer (APS itself or the stand-in)."""
    base = f"{issuer}/authentication/v2"
    default_userinfo = "https://api.userprofile.autodesk.com/userinfo" if issuer == APS_HOST else f"{issuer}/userinfo"
    return Endpoints(
        issuer=issuer,
        authorize=f"{base}/authorize",
        token=f"{base}/token",
        userinfo=userinfo or default_userinfo,
        revoke=f"{base}/revoke",
        introspect=f"{base}/introspect",
        logout=f"{base}/logout",
    )


def discover(issuer: str, http: requests.Session, timeout: float, userinfo: str | None = None, revocation: str | None = None) -> Endpoints:
    """Read an OpenID Connect provider's endpoints from its discovery document, and its RFC 8414 metadata for what that lacks."""
    url = f"{issuer}/.well-known/openid-configuration"
    try:
        reply = http.get(url, timeout=timeout)
        reply.raise_for_status()
        doc = reply.json()
        # OIDC Discovery does not require a revocation endpoint; some providers list it only in RFC 8414 metadata.
        more = _oauth_metadata(issuer, http, timeout) if not (_revocation(doc) and _introspection(doc)) else {}
        endpoints = Endpoints(
            issuer=doc.get("issuer", issuer).rstrip("/"),
            authorize=doc["authorization_endpoint"],
            token=doc["token_endpoint"],
            userinfo=userinfo or doc["userinfo_endpoint"],
            revoke=revocation or _revocation(doc) or _revocation(more),
            introspect=_introspection(doc) or _introspection(more),
            logout=doc.get("end_session_endpoint"),
            jwks=doc.get("jwks_uri"),
        )
    except (requests.RequestException, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"OAUTH_ISSUER discovery document {url} could not be read ({type(exc).__name__}).") from None
    if not endpoints.revoke:
        log.warning("Sign-out cannot revoke refresh tokens at %s: it names no revocation endpoint; set OAUTH_REVOCATION_URL if it has one.", issuer)
    return endpoints


def _revocation(doc: dict) -> str | None:
    # APS's own document names these revoke_endpoint / introspect_endpoint.
    return doc.get("revocation_endpoint") or doc.get("revoke_endpoint")


def _introspection(doc: dict) -> str | None:
    return doc.get("introspection_endpoint") or doc.get("introspect_endpoint")


def _oauth_metadata(issuer: str, http: requests.Session, timeout: float) -> dict:
    """Return the provider's RFC 8414 authorization server metadata, or nothing if it serves none."""
    parts = urlsplit(issuer)
    # RFC 8414 §3 puts the well-known segment between the host and the issuer's path; providers mounted
    # under a path (django-oauth-toolkit's /o/) often serve it after the issuer instead.
    urls = dict.fromkeys(
        [f"{parts.scheme}://{parts.netloc}/.well-known/oauth-authorization-server{parts.path.rstrip('/')}", f"{issuer}/.well-known/oauth-authorization-server"]
    )
    for url in urls:
        try:
            reply = http.get(url, timeout=timeout)
            doc = reply.json() if reply.status_code == 200 else None
        except (requests.RequestException, ValueError):
            continue
        # RFC 8414 §3.3: metadata that names another issuer must not be used.
        if isinstance(doc, dict) and str(doc.get("issuer", "")).rstrip("/") == issuer.rstrip("/"):
            return doc
    return {}


class Provider:
    """An OAuth 2.0 confidential client of one authorization server."""

    def __init__(
        self, endpoints: Endpoints, client_id: str, client_secret: str | None, timeout: float, http: requests.Session, refresh_timeout: float | None = None
    ):
        self.endpoints = endpoints
        self.client_id = client_id
        self.client_secret = client_secret
        self.timeout = timeout
        # Connect as quickly as any call, but give a refresh longer to answer: a reply lost to a
        # short read timeout after the provider rotated is a sign-in lost.
        self.refresh_timeout = (timeout, max(timeout, refresh_timeout or timeout))
        self.http = http

    def authorize_url(self, *, redirect_uri: str, scope: str, state: str, code_challenge: str, nonce: str | None = None, prompt: str | None = None) -> str:
        params = {
            "client_id": self.client_id,
            "response_type": "code",
            "redirect_uri": redirect_uri,
            "scope": scope,
            "state": state,
            "code_challenge": code_challenge,
            "code_challenge_method": "S256",
        }
        if nonce:
            params["nonce"] = nonce
        if prompt:
            params["prompt"] = prompt
        elif "offline_access" in scope.split():
            # OpenID Connect Core §11: offline access is granted with prompt=consent; strict providers
            # (oidc-provider) otherwise drop offline_access and issue no refresh token at all.
            params["prompt"] = "consent"
        return f"{self.endpoints.authorize}?{urlencode(params)}"

    def is_issuer(self, iss: object) -> bool:
        """Tell whether an iss value (a reply's RFC 9207 parameter, an ID token's claim) names this provider.

        endpoints.issuer has lost any trailing slash (config, discovery), so neither side keeps one.
        """
        return isinstance(iss, str) and iss.rstrip("/") == self.endpoints.issuer.rstrip("/")

    def logout_url(self, post_logout_redirect_uri: str | None = None) -> str | None:
        """Return the provider's end-session URL (OIDC RP-Initiated Logout; APS v2 logout), or None without one."""
        if not self.endpoints.logout:
            return None
        if not post_logout_redirect_uri:
            return self.endpoints.logout
        # With no id_token_hint, RP-Initiated Logout 1.0 wants client_id to check the redirect against.
        params = {"post_logout_redirect_uri": post_logout_redirect_uri, "client_id": self.client_id}
        return f"{self.endpoints.logout}?{urlencode(params)}"

    def exchange_code(self, code: str, redirect_uri: str, code_verifier: str) -> TokenResponse:
        return self._token({"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri, "code_verifier": code_verifier})

    def refresh(self, refresh_token: str, scope: str | None = None) -> TokenResponse:
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        if scope:
            form["scope"] = scope
        return self._token(form, timeout=self.refresh_timeout)

    def userinfo(self, access_token: str) -> dict:
        reply = self._send("GET", self.endpoints.userinfo, headers={"Authorization": f"Bearer {access_token}"})
        error = bearer_error(reply)
        if reply.status_code == 401 and error in (None, "invalid_token"):
            raise InvalidGrant("access token rejected by userinfo")
        if reply.status_code in (401, 403):
            # A refusal with its reason, often with no body at all: an answer, not an outage.
            raise TokenRefused(error or _json_error(reply) or f"http_{reply.status_code}", "userinfo refused the access token")
        return self._json(reply)

    def revoke(self, token: str, hint: str = "refresh_token") -> None:
        """Revoke a token; best effort, since the caller forgets it either way."""
        if self.endpoints.revoke:
            self._send("POST", self.endpoints.revoke, data={"token": token, "token_type_hint": hint}, auth=self._auth())

    def introspect(self, token: str) -> dict:
        if not self.endpoints.introspect:
            raise ProviderRejected("unsupported", "the provider has no introspection endpoint")
        return self._json(self._send("POST", self.endpoints.introspect, data={"token": token}, auth=self._auth()))

    def _auth(self) -> tuple[str, str]:
        # APS v2 wants client credentials in the Basic header, never also in the body.
        return (self.client_id, self.client_secret or "")

    def _token(self, form: dict, timeout: float | tuple[float, float] | None = None) -> TokenResponse:
        body = self._json(self._send("POST", self.endpoints.token, data=form, auth=self._auth(), timeout=timeout or self.timeout))
        try:
            return TokenResponse(
                access_token=str(body["access_token"]),
                expires_in=int(body.get("expires_in", 3599)),
                refresh_token=body.get("refresh_token"),
                scope=body.get("scope"),
                id_token=body["id_token"] if isinstance(body.get("id_token"), str) else None,
            )
        except (KeyError, TypeError, ValueError):
            raise ProviderUnavailable("token response without a usable access_token", delivered=True) from None

    def _send(self, method: str, url: str, timeout: float | tuple[float, float] | None = None, **kwargs) -> requests.Response:
        try:
            reply = self.http.request(method, url, timeout=timeout or self.timeout, **kwargs)
        except requests.RequestException as exc:
            raise ProviderUnavailable(f"{type(exc).__name__} talking to the provider", delivered=_maybe_delivered(exc)) from None
        if reply.status_code >= 500 or reply.status_code == 429:
            raise ProviderUnavailable(f"provider answered {reply.status_code}")
        return reply

    def _json(self, reply: requests.Response) -> dict:
        try:
            body = reply.json()
        except ValueError:
            raise ProviderUnavailable(f"provider answered {reply.status_code} without JSON", delivered=reply.ok) from None
        if not isinstance(body, dict):
            raise ProviderUnavailable("provider answered JSON that is not an object", delivered=reply.ok)
        if reply.status_code >= 400:
            error = str(body.get("error", "")) or f"http_{reply.status_code}"
            if error == "invalid_grant":
                raise InvalidGrant(str(body.get("error_description", "")))
            raise ProviderRejected(error, str(body.get("error_description", "")))
        return body


def subject_of(claim: object) -> str:
    """Return a subject claim as text: a string, or the number some providers send (never a bool); "" for anything else."""
    if isinstance(claim, bool) or not isinstance(claim, str | int):
        return ""
    return str(claim)


BEARER_ERROR = re.compile(r'\berror\s*=\s*"?([A-Za-z_]+)"?')


def bearer_error(reply: requests.Response) -> str | None:
    """Return the error of a resource server's WWW-Authenticate: Bearer challenge (RFC 6750 §3), if it names one."""
    challenge = reply.headers.get("WWW-Authenticate", "")
    if not challenge.lower().startswith("bearer"):
        return None
    found = BEARER_ERROR.search(challenge)
    return found[1][:64] if found else None


def _json_error(reply: requests.Response) -> str | None:
    try:
        body = reply.json()
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    return error[:64] if isinstance(error, str) and error.isidentifier() else None


def _maybe_delivered(exc: requests.RequestException) -> bool:
    """Tell whether a failed call may have reached the provider: only a connection never made surely did not."""
    if isinstance(exc, requests.ConnectTimeout):
        return False
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return not isinstance(reason, NewConnectionError)


class BackChannel(HTTPAdapter):
    """Send server-to-server calls for the browser-facing issuer URL to the provider's internal address."""

    def __init__(self, public: str, internal: str):
        super().__init__()
        self.public, self.internal = public.rstrip("/"), internal.rstrip("/")

    def send(self, request: requests.PreparedRequest, **kwargs) -> requests.Response:
        request.url = self.internal + request.url[len(self.public) :]
        return super().send(request, **kwargs)
