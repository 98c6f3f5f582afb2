"""Sign in with the authorization code flow (PKCE S256 + state), and sign out."""

import base64
import hashlib
import hmac
import secrets
import time
import unicodedata
from urllib.parse import urljoin

from flask import Blueprint, Response, abort, after_this_request, current_app, g, make_response, redirect, render_template, request, url_for
from itsdangerous import BadData, URLSafeTimedSerializer

import downscope
import events
import grants
import metrics
import policy
import sessions
import signout
import tokens
import viewer_authorization
from grants import SignInRequired
from locking import LockTimeout
from models import db
from provider import InvalidGrant, ProviderError, ProviderRejected, ProviderUnavailable, TokenResponse, subject_of
from redirects import safe_next

bp = Blueprint("auth", __name__, url_prefix="/auth")

# The pre-sign-in state lives in a signed cookie bound to this browser, for at most 10 minutes.
FLOW_MAX_AGE = 600
# Sign-ins a browser may have under way at once (two tabs, a retry), each keyed by its state; the
# oldest gives way. Finished ones are remembered as long, so a reloaded callback finds its page.
MAX_FLOWS = 4
# Browsers keep cookies up to 4096 bytes; a bigger one is not ours.
MAX_FLOW_COOKIE = 3800
# A browser may try one silent sign-in (prompt=none) a minute: a grant that dies at once cannot loop.
SILENT_RETRY_AFTER = 60
# The kinds of flow through the provider: a sign-in, or the viewer's own authorization (OAUTH_VIEWER_TOKEN=authorize).
SIGN_IN, VIEWER = "sign-in", "viewer"
VIEWER_STATE = "viewer."
# What a provider answers to prompt=none when the person must see its pages (OIDC Core §3.1.2.6).
INTERACTION_ERRORS = {"login_required", "interaction_required", "consent_required", "account_selection_required"}


@bp.get("/login")
@policy.sign_in_flow
@policy.rate_limited("signin_limiter")
def login() -> Response:
    """Send the browser to the provider's authorize endpoint."""
    silent = request.args.get("silent") == "1" and _may_resume_silently()
    # prompt=login: "Sign in as someone else" asks the provider for its form even while it knows this browser.
    prompt = "none" if silent else "login" if request.args.get("prompt") == "login" else None
    response = _to_provider(SIGN_IN, current_app.config["OAUTH_SCOPES"], safe_next(request.args.get("next")), silent, prompt)
    if silent:
        response.set_cookie(_silent_cookie(), "1", max_age=SILENT_RETRY_AFTER, **sessions.cookie_attributes())
    signout.forget(response)  # the person asked to sign in again
    return response


def _to_provider(kind: str, scope: str, next_path: str, silent: bool, prompt: str | None, **more) -> Response:
    """Redirect to the provider's authorize endpoint, keeping this flow (its kind, state, PKCE verifier, nonce) in the browser's sign-in cookie."""
    verifier = secrets.token_urlsafe(64)
    # APS requires a nonce with openid; a sign-in reads the person from userinfo, the viewer's authorization checks it in the ID token.
    nonce = secrets.token_urlsafe(16) if "openid" in scope.split() else None
    # A viewer state says so even when its flow is gone from the cookie (_unknown_flow); it is no secret.
    state = (VIEWER_STATE if kind == VIEWER else "") + secrets.token_urlsafe(32)
    flow = {"kind": kind, "state": state, "verifier": verifier, "nonce": nonce, "next": next_path, "silent": silent}
    flow |= {"at": int(time.time())} | more
    provider = current_app.extensions["provider"]
    url = provider.authorize_url(redirect_uri=redirect_uri(), scope=scope, state=flow["state"], code_challenge=_challenge(verifier), nonce=nonce, prompt=prompt)
    response = redirect(url)
    flows = _read_flows()
    flows["open"].append(flow)
    _write_flows(response, flows)
    return response


def _may_resume_silently() -> bool:
    """Tell whether this browser may be signed in without a page: it presents a session that ended without the person's say.

    A grant that died ends its sessions but keeps their rows; a sign-out deletes them. So a link to
    ?silent=1 from anywhere resumes only what a dead grant took, never undoes a sign-out, and never
    swaps a live session for whoever the provider's cookie names (a login forged at the provider).
    """
    if not current_app.config["SILENT_SIGN_IN"] or request.cookies.get(_silent_cookie()):
        return False  # off, or tried within the last minute
    return g.cookie_session is not None and g.session is None and signout.reason() is None


@bp.get("/viewer")
@policy.sign_in_flow
@policy.rate_limited("signin_limiter")
def viewer() -> Response:
    """Send the browser to the provider for the viewer's token alone (OAUTH_VIEWER_TOKEN=authorize), silently unless asked not to.

    Only this browser's sign-in cookie changes here (the flow it starts): the token is stored by the
    callback, for the person who started it, and never touches their grant or session.
    """
    next_path = safe_next(request.args.get("next") or url_for("pages.viewer"))
    if not viewer_authorization.enabled():
        abort(404, "This app does not get the viewer's token by an authorization of its own.")
    if g.session is None:
        return redirect(url_for("auth.login", next=next_path))
    silent = request.args.get("interactive") != "1"
    # The person it is for: the callback stores the token only for them.
    return _to_provider(VIEWER, viewer_authorization.scope(), next_path, silent, "none" if silent else None, viewer_for=g.session.user_id)


@bp.get("/callback")
@policy.sign_in_flow
@policy.rate_limited("signin_limiter")
def callback() -> Response:
    """Finish sign-in: check state, exchange the code, read the person, start a session (or, for the viewer's authorization, store its token)."""
    flows = _read_flows()
    flow = _use_flow(flows, request.args.get("state", ""))
    if flow is not None and flow["kind"] == VIEWER:
        return _viewer_reply(flow) or _store_viewer_token(flow)
    answer = _unknown_flow(flows) if flow is None else _refused_reply(flow)
    if answer is not None:
        return answer
    exchanged = _exchange(flow)
    if isinstance(exchanged, Response):
        return exchanged
    return _sign_in(flow, *exchanged)


def _use_flow(flows: dict, state: str) -> dict | None:
    """Return this browser's sign-in that the state names; it is used up, whatever happens next."""
    flow = next((f for f in flows["open"] if _same(state, f["state"])), None)
    if flow is not None:
        # The browser's other sign-ins stay open; this one is remembered as done, for a reloaded callback.
        flows["open"].remove(flow)
        flows["done"].append({"state": flow["state"], "next": flow["next"], "at": flow["at"]})
    if flow is not None or flows["unreadable"]:  # drop what cannot be read

        @after_this_request
        def write_back(response: Response) -> Response:
            _write_flows(response, flows)
            return response

    return flow


def _unknown_flow(flows: dict) -> Response | tuple[str, int]:
    """Answer a callback that none of this browser's open sign-ins expects."""
    state = request.args.get("state", "")
    done = next((f for f in flows["done"] if _same(state, f["state"])), None)
    if g.user is not None and done is None and state.startswith(VIEWER_STATE):
        # Two tabs went for the viewer's token at once, and the other's cookie replaced this one's flow.
        return _failed(409, "This tab's request for the viewer's token gave way to another", VIEWER_LOST, retry=url_for("auth.viewer"))
    if g.user is not None and (done is not None or not flows["open"]):
        # Signed in already: a reloaded (or expired) callback is no error, the person goes where it led.
        return redirect(done["next"] if done else url_for("pages.home"))
    if "error" in request.args:
        return _failed(400, "The provider did not sign you in.", _provider_error_text(request.args["error"]))
    if not flows["open"]:
        return _failed(400, "This sign-in expired or was started in another browser.", "Please start again.")
    # Not one of this browser's sign-ins (forged, or a code meant for someone else): leave its own be.
    return _failed(400, "This sign-in link is not the one this browser started.", "Please start again.")


def _refused_reply(flow: dict) -> tuple[str, int] | None:
    """Answer a reply that brings no code to exchange, or comes from another provider; None for one to exchange."""
    args, again = request.args, url_for("auth.login", next=flow["next"])
    if "error" in args and flow.get("silent") and args["error"] in INTERACTION_ERRORS:
        # The silent attempt found no live session at the provider: now the person signs in there.
        return _silent_failed(again)
    if "error" in args:
        return _failed(400, "The provider did not sign you in.", _provider_error_text(args["error"]), retry=again)
    return _unusable_reply(again)


def _unusable_reply(again: str) -> tuple[str, int] | None:
    """Answer a reply from another provider, or one without a code; None for one to exchange."""
    args = request.args
    if "iss" in args and not current_app.extensions["provider"].is_issuer(args["iss"]):
        # RFC 9207: the reply came from another authorization server than the one we asked.
        return _failed(400, "The sign-in reply came from an unexpected provider.", "Please start again.", retry=again)
    if not args.get("code"):
        return _failed(400, "The provider's reply had no authorization code.", "Please start again.", retry=again)
    return None


VIEWER_INTERACTION = (
    "You are still signed in here. To give the viewer its token, the provider needs you on its own pages first "
    "(to sign in there again, or to allow this app to show your models)."
)
VIEWER_NOT_YOU = (
    "You are still signed in here as yourself. The provider answered for someone else (this browser may be signed in there "
    "as another person): sign out there, or sign in there as yourself, then open the viewer again."
)
VIEWER_UNKNOWN = (
    "You are still signed in here. The provider's answer did not say whose it is, so the viewer got nothing from it. "
    "Please try again; if this keeps happening, the app's administrator should check the provider's ID tokens or introspection."
)
VIEWER_TOO_WIDE = (
    "You are still signed in here. The provider granted more than the viewer may hold, so that token was revoked and the "
    "viewer got nothing. The app's administrator should make OAUTH_VIEWER_SCOPE match what the provider grants."
)
VIEWER_LOST = (
    "You are still signed in. Another tab asked the provider for the viewer's token at the same moment, and this browser "
    "keeps only one of two such requests started together: open the viewer again to get its token."
)
# How each refusal of the viewer authorization's answer is shown: status, title, detail.
VIEWER_REFUSALS = {
    viewer_authorization.NotThePerson: (403, "The provider's answer is not for you", VIEWER_NOT_YOU),
    viewer_authorization.PersonUnknown: (403, "The provider did not say who you are", VIEWER_UNKNOWN),
    viewer_authorization.ScopeTooWide: (502, "The provider gave more than the viewer may hold", VIEWER_TOO_WIDE),
}


def _viewer_reply(flow: dict) -> tuple[str, int] | None:
    """Answer a reply to the viewer's authorization that brings no usable code; the person's sign-in stands whatever it says."""
    args, again = request.args, url_for("auth.viewer", next=flow["next"])
    if args.get("error") in INTERACTION_ERRORS:
        # The provider wants to see the person: the same authorization, with its pages this time.
        return _failed(200, "The provider needs you first", VIEWER_INTERACTION, retry=url_for("auth.viewer", next=flow["next"], interactive=1))
    if "error" in args:
        return _failed(400, "The provider gave no token for the viewer.", _provider_error_text(args["error"]), retry=again)
    return _unusable_reply(again)


def _store_viewer_token(flow: dict) -> Response | tuple[str, int]:
    """Store the viewer's token from its own authorization, for the person who started it, and go back to the viewer."""
    again = url_for("auth.viewer", next=flow["next"])
    if g.session is None or g.session.user_id != flow["viewer_for"]:
        # Signed out, or someone else signed in on this browser, since this authorization started.
        return _failed(400, "This viewer authorization was started by another sign-in.", "Please sign in, then open the viewer again.")
    try:
        viewer_authorization.store(g.session.user_id, request.args["code"], redirect_uri(), flow, trigger=f"{request.method} {request.path}")
    except viewer_authorization.SignedOut:
        return redirect(flow["next"])  # the page it leads to says so
    except viewer_authorization.Refused as refusal:
        status, title, detail = VIEWER_REFUSALS[type(refusal)]
        return _failed(status, title, detail, retry=again)
    except ProviderUnavailable:
        return _failed(503, "The provider is not answering right now.", "You are still signed in. Please try again in a moment.", retry=again)
    except LockTimeout:
        # The code is used up: Try again starts a new authorization, never this callback again.
        return _failed(503, "Please try again in a moment", "Your sign-in is busy being renewed; you are still signed in.", retry=again)
    except (InvalidGrant, ProviderRejected):
        return _failed(400, "The provider refused the viewer's token.", "You are still signed in. Please try again.", retry=again)
    return redirect(flow["next"])


def _exchange(flow: dict) -> tuple[TokenResponse, dict] | Response:
    """Exchange the code for a grant with lasting access and read who signed in; or answer why not."""
    provider, again = current_app.extensions["provider"], url_for("auth.login", next=flow["next"])
    try:
        grant = provider.exchange_code(request.args["code"], redirect_uri(), flow["verifier"])
        if not grant.refresh_token:
            grants.revoke([(grant.access_token, "access_token")])
            if flow.get("silent"):
                # Some providers (oidc-provider) drop offline_access without consent: the person must interact.
                return _silent_failed(again)
            return make_response(_failed(400, "The provider did not grant lasting access (no refresh token).", "Please start again.", retry=again))
        return grant, provider.userinfo(grant.access_token)
    except ProviderUnavailable:
        # Try again where this sign-in was going, as silently as it was meant to be.
        again = url_for("auth.login", next=flow["next"], silent=1 if flow.get("silent") else None)
        response = make_response(_failed(503, "The provider is not answering right now.", "Please try again in a moment.", retry=again))
        response.delete_cookie(_silent_cookie(), **sessions.cookie_attributes())
        return response
    except (InvalidGrant, ProviderRejected):
        return make_response(_failed(400, "The provider refused this sign-in.", "The link may have been used already. Please start again.", retry=again))


def _sign_in(flow: dict, grant: TokenResponse, info: dict) -> Response | tuple[str, int]:
    """Store the grant for the person the provider named and start this browser's session, then go where the sign-in led."""
    subject = subject_of(info.get("sub"))
    if not subject or _storable(subject) != subject:
        # The subject is the person's identity: cleaning it could make two people one. Keep nothing of the grant.
        grants.revoke([(grant.refresh_token, "refresh_token"), (grant.access_token, "access_token")])
        if not subject:
            return _failed(400, "The provider did not say who you are.", "Please start again.", retry=url_for("auth.login", next=flow["next"]))
        return _failed(400, "The provider named you in a way this app cannot store.", "Please contact the app's administrator.")
    if g.session is not None and g.account().subject != subject:
        # Someone else signed in on this browser: the previous person is signed out here, as by "Sign out".
        grants.revoke(grants.end_sessions(g.session.user_id, {g.session.id_hash}))
    elif g.cookie_session is not None:
        sessions.end(g.cookie_session.id_hash)  # a new id at every sign-in (no session fixation), live or ended
    user = grants.save_sign_in(subject, _storable(info.get("name")), _storable(info.get("email")), grant)
    cookie = sessions.start(user, provider_sid=grant.sid)
    db.session.commit()
    metrics.count_sign_in("silent" if flow.get("silent") else "interactive")
    tokens.learn_introspection(grant.refresh_token)
    _prefetch_viewer_token(user)
    response = redirect(flow["next"])
    sessions.set_cookie(response, cookie, user.refresh_expires_at)
    return response


# Claims are stored in String(255) columns.
CLAIM_LENGTH = 255


def _storable(claim: object) -> str:
    """Return a text claim as the database can hold it: no control characters, no lone surrogates, 255 characters at most.

    PostgreSQL refuses NUL in text, and no encoding holds a lone surrogate (JSON's "\\ud800").
    """
    if not isinstance(claim, str):
        return ""
    return "".join(c for c in claim if unicodedata.category(c) not in ("Cc", "Cs"))[:CLAIM_LENGTH]


def _prefetch_viewer_token(user) -> None:
    """Get the shareable viewer token right after sign-in, when the grant covers the viewer scope.

    A viewer token that needs an authorization of its own (OAUTH_VIEWER_TOKEN=authorize) is got when
    the viewer first asks for it instead: the sign-in stays one trip through the provider, and a
    provider that wants to see the person again then never stands between them and their page.
    """
    if downscope.by_authorization():
        return
    scope = downscope.viewer_scope(user)
    if scope is None or not set(scope.split()) <= set(current_app.config["OAUTH_SCOPES"].split()):
        return
    try:
        tokens.viewer_token(user, trigger=f"{request.method} {request.path} {events.AT_SIGN_IN}")
    except (ProviderError, LockTimeout, SignInRequired) as exc:
        # The page that needs it will try again; the sign-in itself stands.
        current_app.logger.warning("viewer token not fetched at sign-in: %s", type(exc).__name__)


@bp.get("/logout")
@policy.sign_in_flow
def logout_page() -> str:
    """Show the Sign out button to someone who typed the address: signing out itself is a POST with the CSRF token."""
    return render_template("logout.html")


@bp.post("/logout")
@policy.sign_in_flow
def logout() -> Response:
    """End this browser's session; revoke the tokens when it was the person's last."""
    return _end_sessions({g.session.id_hash} if g.session is not None else set())


@bp.post("/logout-everywhere")
@policy.sign_in_flow
def logout_everywhere() -> Response:
    """End all of the person's sessions and revoke their tokens."""
    return _end_sessions(None)


@bp.post("/sessions/end")
@policy.sign_in_flow
def end_device() -> Response:
    """End one of the person's sessions (a device), chosen from the devices list."""
    target = request.form.get("session", "")
    if g.session is not None and target not in {s.id_hash for s in g.account().sessions}:
        abort(404, "No such session of yours.")
    return _end_sessions({target}, next_path=safe_next(request.form.get("next")))


def _end_sessions(chosen: set[str] | None, next_path: str = "/") -> Response:
    """End the chosen sessions of the person (all for None); with the last one, forget and revoke the tokens."""
    if g.session is None:
        response = redirect(url_for("pages.home"))
        sessions.clear_cookie(response)
        return response
    this_ended = chosen is None or g.session.id_hash in chosen
    # The local state goes first and for good; the provider is told afterwards, best effort.
    grants.revoke(grants.end_sessions(g.session.user_id, chosen))
    metrics.count_sign_out("everywhere" if chosen is None else "device")
    at_provider = provider_logout_url() if this_ended else None
    response = redirect(at_provider or (url_for("pages.home") if this_ended else next_path))
    if this_ended:
        sessions.clear_cookie(response)
        signout.remember(response, "everywhere" if chosen is None else "here")
    return response


def provider_logout_url() -> str | None:
    """Return where to send the browser after a sign-out here to end its session at the provider too, if set up to."""
    config = current_app.config
    if not config["OAUTH_LOGOUT_AT_PROVIDER"]:
        return None
    back = config["OAUTH_POST_LOGOUT_REDIRECT_URI"]
    if not back and config["OAUTH_PROVIDER"] != "autodesk":
        # This app's home, on the origin registered with the provider (not one built from the Host header) when there is one.
        registered = config["OAUTH_REDIRECT_URI"]
        back = urljoin(registered, "/") if registered else url_for("pages.home", _external=True)
    return current_app.extensions["provider"].logout_url(back)


def redirect_uri() -> str:
    return current_app.config["OAUTH_REDIRECT_URI"] or url_for("auth.callback", _external=True)


def _silent_cookie() -> str:
    return "__Host-silent-signin" if current_app.config["SESSION_COOKIE_SECURE"] else "silent-signin"


def _challenge(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


def _flow_cookie() -> str:
    return "__Host-signin" if current_app.config["SESSION_COOKIE_SECURE"] else "signin"


def _flow_serializer() -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(current_app.config["SECRET_KEY"], salt="sign-in-flow")


def _read_flows() -> dict:
    """Read this browser's sign-ins under way and lately finished, dropping expired, tampered or oversized ones."""
    flows = {"open": [], "done": [], "unreadable": False}
    raw = request.cookies.get(_flow_cookie(), "")
    if not raw:
        return flows
    try:
        if len(raw) > MAX_FLOW_COOKIE:
            raise BadData("oversized")
        stored = _flow_serializer().loads(raw, max_age=FLOW_MAX_AGE)
    except BadData:
        flows["unreadable"] = True
        return flows
    oldest = time.time() - FLOW_MAX_AGE
    for group, fields in (("open", ("kind", "state", "verifier", "next")), ("done", ("state", "next"))):
        entries = stored.get(group) if isinstance(stored, dict) else None
        for flow in entries if isinstance(entries, list) else []:
            if isinstance(flow, dict) and all(isinstance(flow.get(k), str) for k in fields) and isinstance(flow.get("at"), int) and flow["at"] > oldest:
                flows[group].append(flow)
    return flows


def _write_flows(response: Response, flows: dict) -> None:
    """Keep the newest sign-ins in this browser's pre-sign-in cookie, or drop the cookie when none is left."""
    kept = {"open": flows["open"][-MAX_FLOWS:], "done": flows["done"][-MAX_FLOWS:]}
    value = _flow_serializer().dumps(kept)
    while len(value) > MAX_FLOW_COOKIE and (kept["done"] or len(kept["open"]) > 1):
        kept["done" if kept["done"] else "open"].pop(0)  # long next paths: the oldest give way
        value = _flow_serializer().dumps(kept)
    if not kept["open"] and not kept["done"]:
        response.delete_cookie(_flow_cookie(), **sessions.cookie_attributes())
        return
    response.set_cookie(_flow_cookie(), value, max_age=FLOW_MAX_AGE, **sessions.cookie_attributes())


def _same(sent: str, expected: str) -> bool:
    # compare_digest refuses non-ASCII str, and anything may arrive in a query string.
    return hmac.compare_digest(sent.encode(), expected.encode())


# The provider's error codes (RFC 6749 §4.1.2.1) in words; its error_description is not shown,
# since anyone can put any text into a callback link.
PROVIDER_ERRORS = {
    "access_denied": "You chose not to sign in, or the provider refused access.",
    "login_required": "The provider needs you to sign in there first.",
    "consent_required": "The provider needs your consent first.",
    "temporarily_unavailable": "The provider is busy right now.",
    "server_error": "The provider ran into a problem.",
}


def _provider_error_text(error: str) -> str:
    reason = PROVIDER_ERRORS.get(error, "The provider could not complete the sign-in.")
    return f"{reason} Please try again."


SILENT_FAILED = (
    "Your sign-in here had ended (after a long time away, a sign-out at the provider, or a lost connection), and the provider needs you to sign in there again."
)


def _silent_failed(again: str) -> Response:
    """Say the person must sign in at the provider, and drop the ended session's cookie: pages stop trying to resume it."""
    response = make_response(_failed(200, "Please sign in again", SILENT_FAILED, retry=again))
    sessions.clear_cookie(response)
    return response


def _failed(status: int, title: str, detail: str, retry: str | None = None) -> tuple[str, int]:
    # "Try again" starts a sign-in that leads where this one would have.
    return render_template("error.html", title=title, detail=detail, retry=retry or url_for("auth.login")), status
