"""An embedded authorization server that behaves like Autodesk APS Authentication v2.

For development and tests only: a person signs in by typing a name. It keeps APS's rules
that matter to a client: single-use codes bound to client, redirect URI and PKCE challenge;
single-use rotating refresh tokens that live 15 days; one refresh token per person per app;
refreshes narrowed to a subset of the granted scope. In strict mode, replaying a used refresh
token also revokes the person's current one, as Keycloak and panva/oidc-provider do. Like a
real provider it remembers the browser that signed in (a cookie of its own), so authorize with
prompt=none signs that person in again without a form, or answers login_required. It also serves
a small APS Data Management API (standin/data.py) for the tokens it issues.
"""

import base64
import binascii
import hashlib
import os
import time
import unicodedata
from collections.abc import Mapping
from urllib.parse import urlencode, urlsplit

from flask import Blueprint, Flask, Response, abort, current_app, g, jsonify, redirect, render_template, request
from sqlalchemy import delete, select, update

from standin import data
from standin.inprocess import mark_slept, slow_down
from standin.store import Store, access_tokens, digest, refresh_tokens

REFRESH_TTL = 15 * 24 * 3600
BROWSER_SESSION_TTL = 30 * 24 * 3600
BROWSER_COOKIE = "standin_session"
# The only scopes it grants: APS's that this app uses, and OpenID Connect's for the generic-provider mode.
SCOPES = ("user-profile:read", "data:read", "data:write", "viewables:read", "openid", "profile", "email", "offline_access")
# Without registered redirect URIs the client is the app it is embedded in: this path on the stand-in's own origin.
OWN_ORIGIN_CALLBACK = "/auth/callback"
SIGN_IN_FIELDS = ("client_id", "redirect_uri", "scope", "state", "code_challenge", "code_challenge_method", "nonce")


class OAuthError(Exception):
    def __init__(self, error: str, description: str, status: int = 400):
        super().__init__(description)
        self.error, self.description, self.status = error, description, status


bp = Blueprint("standin", __name__)


def create_app(settings: Mapping) -> Flask:
    """Create the stand-in provider from its settings.

    settings: issuer, clients ({client_id: secret}), redirect_uris (exact URIs allowed; empty
    allows only /auth/callback on the stand-in's own origin), database_url, access_ttl, strict; and
    two habits of real providers, off unless set: narrows_quietly (a narrowed refresh narrows the
    whole grant, no reply names its scope, userinfo refuses with an empty 403),
    introspects_access_only (introspection answers active: false for every refresh token) and
    grant_per_authorization (a code exchange leaves the person's other refresh tokens alone: every
    authorization is a grant of its own, as OpenID providers keep them, not APS's one per person per app).
    """
    app = Flask(__name__)
    app.config["STANDIN"] = dict(settings)
    app.extensions["standin_store"] = Store(settings["database_url"])
    app.register_error_handler(OAuthError, oauth_error)
    app.after_request(headers)
    app.after_request(mark_slept)
    app.register_blueprint(bp)
    app.register_blueprint(data.bp)
    return app


def _store() -> Store:
    return current_app.extensions["standin_store"]


def _settings() -> Mapping:
    return current_app.config["STANDIN"]


def oauth_error(exc: OAuthError):
    return jsonify(error=exc.error, error_description=exc.description), exc.status


def headers(response: Response) -> Response:
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    # Its sign-in page must not be framed (clickjacking a consent) and runs no script at all. The
    # form posts here and is redirected to the client, which form-action must allow too.
    client = g.get("client_origin")
    form_action = f"'self' {client}" if client else "'self'"
    response.headers["Content-Security-Policy"] = f"default-src 'none'; style-src 'self'; form-action {form_action}; frame-ancestors 'none'; base-uri 'none'"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


@bp.get("/.well-known/openid-configuration")
def discovery():
    issuer = _settings()["issuer"]
    base = f"{issuer}/authentication/v2"
    return jsonify(
        issuer=issuer,
        authorization_endpoint=f"{base}/authorize",
        token_endpoint=f"{base}/token",
        userinfo_endpoint=f"{issuer}/userinfo",
        revocation_endpoint=f"{base}/revoke",
        introspection_endpoint=f"{base}/introspect",
        end_session_endpoint=f"{base}/logout",
        response_types_supported=["code"],
        grant_types_supported=["authorization_code", "refresh_token"],
        code_challenge_methods_supported=["S256"],
        token_endpoint_auth_methods_supported=["client_secret_basic"],
        authorization_response_iss_parameter_supported=True,
        scopes_supported=list(SCOPES),
    )


@bp.route("/authentication/v2/authorize", methods=["GET", "POST"])
def authorize():
    params = request.values
    _check_client_and_redirect(_settings(), params)
    redirect_uri, state, issuer = params["redirect_uri"], params.get("state", ""), _settings()["issuer"]
    if params.get("response_type", "code") != "code":
        return _back(redirect_uri, issuer, error="unsupported_response_type", state=state)
    if params.get("code_challenge_method") != "S256" or not params.get("code_challenge"):
        return _back(redirect_uri, issuer, error="invalid_request", state=state, error_description="PKCE with S256 is required")
    scopes = params.get("scope", "").split()
    if not scopes or not set(scopes) <= set(SCOPES):
        return _back(redirect_uri, issuer, error="invalid_scope", state=state)
    if request.method == "GET":
        return _ask_or_sign_in_silently(params)
    _refuse_cross_site_post()
    if "cancel" in request.form:
        return _back(redirect_uri, issuer, error="access_denied", state=state)
    return _signed_in(params, request.form.get("name", "").strip())


def _refuse_cross_site_post() -> None:
    """Refuse a sign-in form posted from another site: it would sign the browser in as whoever that site chose (login CSRF)."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        abort(403, "Cross-site sign-in refused.")
    origin = request.headers.get("Origin")
    # Under Referrer-Policy: no-referrer browsers send "Origin: null" even from the form's own page; Sec-Fetch-Site vouches then.
    if origin is not None and _origin(origin) != _origin(request.host_url) and not (origin == "null" and site == "same-origin"):
        abort(403, "Cross-site sign-in refused.")


def _ask_or_sign_in_silently(params: Mapping) -> Response | str:
    """Show the sign-in form; with prompt=none, sign the browser's person in again without it, or say they must interact (OIDC Core §3.1.2.6)."""
    if params.get("prompt") != "none":
        return render_template("standin/signin.html", fields={k: params.get(k, "") for k in SIGN_IN_FIELDS})
    redirect_uri, state, issuer = params["redirect_uri"], params.get("state", ""), _settings()["issuer"]
    sub = _store().browser_session(request.cookies.get(BROWSER_COOKIE, ""))
    if sub is None:
        return _back(redirect_uri, issuer, error="login_required", state=state)
    return _back(redirect_uri, issuer, code=_code_for(_store(), params, sub), state=state)


def _signed_in(params: Mapping, name: str) -> Response | tuple[str, int]:
    """Sign in the person who typed this name, remember them in this browser, and send the code back."""
    if not name:
        fields = {k: params.get(k, "") for k in SIGN_IN_FIELDS}
        return render_template("standin/signin.html", fields=fields, missing_name=True), 400
    store, issuer = _store(), _settings()["issuer"]
    person = store.add_person(name)
    response = _back(params["redirect_uri"], issuer, code=_code_for(store, params, person["sub"]), state=params.get("state", ""))
    response.set_cookie(
        BROWSER_COOKIE,
        store.start_browser_session(person["sub"], BROWSER_SESSION_TTL),
        max_age=BROWSER_SESSION_TTL,
        path=request.script_root or "/",
        httponly=True,
        samesite="Lax",
        secure=issuer.startswith("https://"),
    )
    return response


@bp.post("/authentication/v2/token")
def token():
    store, cfg = _store(), _settings()
    client_id = _client(cfg)
    fault = store.take_fault()
    failed = _act_out(fault)
    if failed is not None:
        return failed
    grant_type = request.form.get("grant_type")
    if grant_type == "authorization_code":
        body = _code_grant(store, cfg, client_id)
    elif grant_type == "refresh_token":
        # Like a provider across a network (APS: 100-500 ms): STANDIN_REFRESH_DELAY_MS.
        slow_down(cfg.get("refresh_delay_ms", int(os.environ.get("STANDIN_REFRESH_DELAY_MS") or 0)) / 1000)
        body = _refresh_grant(store, cfg, client_id)
    else:
        raise OAuthError("unsupported_grant_type", f"grant_type {grant_type!r} is not supported")
    if fault and fault["kind"] == "drop":
        return _drop()
    return jsonify(body)


def _act_out(fault: Mapping | None) -> tuple[Response, int] | None:
    """Act out an injected fault before the token endpoint does its work; return its answer when it ends the request."""
    kind = fault["kind"] if fault else None
    if kind == "5xx":
        return jsonify(error="server_error", error_description="injected fault"), 503
    if kind == "invalid_grant":
        raise OAuthError("invalid_grant", "injected fault")
    if kind in ("hang", "timeout"):
        slow_down(fault["delay"])
    if kind == "hang":
        return jsonify(error="server_error", error_description="injected fault"), 503  # too slow, and then nothing done
    return None


@bp.post("/authentication/v2/revoke")
def revoke():
    store = _store()
    _client(_settings())
    token = request.form.get("token", "")
    with store.transaction() as conn:
        conn.execute(update(refresh_tokens).where(refresh_tokens.c.token_hash == digest(token)).values(status="revoked"))
        conn.execute(delete(access_tokens).where(access_tokens.c.token_hash == digest(token)))
    return "", 200


@bp.post("/authentication/v2/introspect")
def introspect():
    store = _store()
    _client(_settings())
    token = request.form.get("token", "")
    access = store.access_token(token)
    if access:
        return _active(access, "access_token")
    refresh = store.refresh_token(token)
    if _settings().get("introspects_access_only"):
        refresh = None  # some providers introspect access tokens only, and call every other token inactive
    if refresh and refresh["status"] == "active" and refresh["expires_at"] > time.time():
        return _active(refresh, "refresh_token")
    return jsonify(active=False)


@bp.get("/authentication/v2/logout")
def logout():
    _store().end_browser_session(request.cookies.get(BROWSER_COOKIE, ""))
    target = request.args.get("post_logout_redirect_uri", "")
    # As APS: only back to where a registered callback lives, never to another site or a javascript: URL.
    if target and _origin(target) in {_origin(uri) for uri in _registered_uris(_settings())} - {None}:
        response = redirect(target)
    else:
        response = Response(render_template("standin/signed_out.html"))
    response.delete_cookie(BROWSER_COOKIE, path=request.script_root or "/", httponly=True, samesite="Lax")
    return response


@bp.get("/userinfo")
def userinfo():
    store = _store()
    header = request.headers.get("Authorization", "")
    access = store.access_token(header[7:]) if header.startswith("Bearer ") else None
    if access is None:
        return jsonify(error="invalid_token", error_description="access token unknown or expired"), 401
    if not {"user-profile:read", "openid"} & set(access["scope"].split()):
        # APS wants user-profile:read (OpenID Connect: openid); a viewer's narrowed token gets nothing.
        challenge = 'Bearer error="insufficient_scope", scope="user-profile:read"'
        if _settings().get("narrows_quietly"):
            return "", 403, {"WWW-Authenticate": challenge}  # the challenge alone says why
        return jsonify(error="insufficient_scope", error_description="user-profile:read is required"), 403, {"WWW-Authenticate": challenge}
    person = store.person(access["sub"])
    return jsonify(sub=person["sub"], name=person["name"], preferred_username=person["name"], email=person["email"], email_verified=True)


def _active(row: Mapping, token_type: str) -> Response:
    """Describe a live token as APS's introspection endpoint does."""
    return jsonify(active=True, token_type=token_type, scope=row["scope"], client_id=row["client_id"], exp=int(row["expires_at"]), userid=row["sub"])


def _code_for(store: Store, params: Mapping, sub: str) -> str:
    """Issue a one-time code for sub, bound to this request's client, redirect URI and PKCE challenge."""
    return store.add_code(
        client_id=params["client_id"],
        redirect_uri=params["redirect_uri"],
        code_challenge=params["code_challenge"],
        scope=" ".join(params["scope"].split()),
        sub=sub,
    )


def _check_client_and_redirect(cfg: Mapping, params: Mapping) -> None:
    """Refuse an unknown client or redirect URI with a page, never a redirect (RFC 6749 §4.1.2.1)."""
    if params.get("client_id") not in cfg["clients"]:
        abort(400, "Unknown client_id.")
    uri = params.get("redirect_uri", "")
    if uri not in _registered_uris(cfg):
        abort(400, "redirect_uri is not registered for this client.")
    g.client_origin = _origin(uri)


def _registered_uris(cfg: Mapping) -> list[str]:
    """Return the exact redirect URIs allowed; unregistered, only the embedding app's callback on this origin."""
    if cfg["redirect_uris"]:
        return cfg["redirect_uris"]
    own = urlsplit(request.host_url)
    hosts = [own.netloc]
    if own.hostname in ("localhost", "127.0.0.1", "::1"):
        # The demo may be opened as 127.0.0.1 while its issuer says localhost: the same server, same port.
        port = f":{own.port}" if own.port else ""
        hosts = [f"{host}{port}" for host in ("localhost", "127.0.0.1", "[::1]")]
    return [f"{own.scheme}://{host}{OWN_ORIGIN_CALLBACK}" for host in hosts]


def _origin(url: str) -> str | None:
    """Return scheme://host[:port] of an http(s) URL, or None for anything else (credentials, bad port, control characters)."""
    if "\\" in url or any(c.isspace() or unicodedata.category(c) == "Cc" for c in url):
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc:
        return None
    default = 443 if parts.scheme == "https" else 80
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{port}" if port and port != default else "")


def _back(redirect_uri: str, issuer: str, **params: str) -> Response:
    """Send the browser back to the client with an RFC 9207 iss parameter."""
    params = {k: v for k, v in params.items() if v} | {"iss": issuer}
    sep = "&" if "?" in redirect_uri else "?"
    return redirect(f"{redirect_uri}{sep}{urlencode(params)}")


def _client(cfg: Mapping) -> str:
    """Authenticate the client by HTTP Basic, as APS v2 wants (credentials in body too -> 400)."""
    header = request.headers.get("Authorization", "")
    if "client_secret" in request.form or "client_id" in request.form and header:
        raise OAuthError("invalid_request", "client credentials must be sent in the Authorization header only")
    if not header.startswith("Basic "):
        raise OAuthError("invalid_client", "client authentication by HTTP Basic is required", 401)
    try:
        client_id, _, secret = base64.b64decode(header[6:], validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise OAuthError("invalid_client", "malformed Basic credentials", 401) from None
    if cfg["clients"].get(client_id) != secret:
        raise OAuthError("invalid_client", "unknown client or wrong secret", 401)
    return client_id


def _code_grant(store: Store, cfg: Mapping, client_id: str) -> dict:
    form = request.form
    grant = store.take_code(form.get("code", ""))
    if grant is None or grant["client_id"] != client_id:
        raise OAuthError("invalid_grant", "authorization code unknown, used or expired")
    if form.get("redirect_uri") != grant["redirect_uri"]:
        raise OAuthError("invalid_grant", "redirect_uri does not match the authorization request")
    verifier = form.get("code_verifier", "")
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    if not verifier or challenge != grant["code_challenge"]:
        raise OAuthError("invalid_grant", "PKCE code_verifier does not match the code_challenge")
    with store.transaction() as conn:
        if not cfg.get("grant_per_authorization"):
            # One refresh token per person per app: a new sign-in invalidates the previous one.
            store.revoke_grant(conn, client_id, grant["sub"])
        body = store.issue(
            conn,
            client_id=client_id,
            sub=grant["sub"],
            scope=grant["scope"],
            access_scope=grant["scope"],
            access_ttl=cfg["access_ttl"],
            refresh_ttl=REFRESH_TTL,
        )
        store.record(conn, "code", grant["sub"])
    return body


def _refresh_grant(store: Store, cfg: Mapping, client_id: str) -> dict:
    form = request.form
    token = form.get("refresh_token", "")
    requested = form.get("scope", "").split()
    failure = None
    with store.transaction() as conn:
        row = conn.execute(select(refresh_tokens).where(refresh_tokens.c.token_hash == digest(token))).mappings().first()
        if row is None or row["client_id"] != client_id:
            failure = OAuthError("invalid_grant", "refresh token unknown")
        elif row["status"] == "used":
            failure = OAuthError("invalid_grant", "refresh token already used")
            if cfg["strict"]:
                # Replay detected: assume theft and kill the whole grant (RFC 9700 §4.14.2).
                store.revoke_grant(conn, client_id, row["sub"])
        elif row["status"] != "active" or row["expires_at"] < time.time():
            failure = OAuthError("invalid_grant", "refresh token revoked or expired")
        elif requested and not set(requested) <= set(row["scope"].split()):
            raise OAuthError("invalid_scope", "requested scope exceeds the granted scope")
        else:
            conn.execute(update(refresh_tokens).where(refresh_tokens.c.token_hash == row["token_hash"]).values(status="used"))
            access_scope = " ".join(requested) if requested else row["scope"]
            # The new refresh token keeps the full grant; only the access token is narrowed (RFC 6749 §6).
            # A provider that narrows quietly narrows the grant too, and says nothing of scope.
            quiet = cfg.get("narrows_quietly")
            body = store.issue(
                conn,
                client_id=client_id,
                sub=row["sub"],
                scope=access_scope if quiet else row["scope"],
                access_scope=access_scope,
                access_ttl=cfg["access_ttl"],
                refresh_ttl=REFRESH_TTL,
            )
            store.record(conn, "refresh", row["sub"])
            if quiet:
                del body["scope"]
            return body
        store.record(conn, "refresh_rejected", row["sub"] if row else "")
    raise failure


def _drop() -> Response:
    """Lose the reply after the work is done, as a dropped connection would."""
    sock = request.environ.get("gunicorn.socket")
    if sock is not None:
        import socket

        sock.shutdown(socket.SHUT_RDWR)
    response = Response("dropped", status=502)
    response.headers["X-Standin-Drop"] = "1"
    return response
