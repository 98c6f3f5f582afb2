"""What a person sees: home, the token lifecycle made visible, their devices, their hubs, and the viewer demo."""

import base64
import binascii
import functools
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from flask import Blueprint, Response, abort, current_app, g, jsonify, redirect, render_template, request, url_for
from sqlalchemy import func, select

import bearer
import events
import signout
import upstream
from grants import REFRESH_TOKEN_LIFETIME
from models import RefreshEvent, User, UserSession, db, utcnow
from redirects import safe_next

bp = Blueprint("pages", __name__)

RECENT_REFRESHES = 8

# The APS Viewer loads its code, styles, fonts, workers and model data from Autodesk's hosts, and
# writes style elements of its own; scripts stay limited to this site and Autodesk's API host.
APS_VIEWER_JS = "https://developer.api.autodesk.com/modelderivative/v2/viewers/7.*/viewer3D.min.js"
APS_VIEWER_CSS = "https://developer.api.autodesk.com/modelderivative/v2/viewers/7.*/style.min.css"
APS_VIEWER_CSP = (
    "default-src 'self'; "
    "script-src 'self' https://developer.api.autodesk.com; "
    "style-src 'self' 'unsafe-inline' https://developer.api.autodesk.com; "
    "img-src 'self' data: blob: https://*.autodesk.com; "
    "font-src 'self' data: https://*.autodesk.com; "
    "connect-src 'self' https://*.autodesk.com wss://*.autodesk.com; "
    "worker-src 'self' blob:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


def login_required(view: Callable) -> Callable:
    """Send a signed-out person through sign-in and back to this page; one signed out on purpose is told so first."""

    @functools.wraps(view)
    def wrapped(*args, **kwargs):
        if g.user is None:
            if signout.reason():
                return signout.page()
            return redirect(url_for("auth.login", next=safe_next(request.full_path.rstrip("?"))))
        return view(*args, **kwargs)

    return wrapped


@bp.get("/")
def home():
    return render_template("home.html", user=g.user)


@bp.get("/session")
@login_required
def session_page():
    """Show the person's tokens as a live timeline (static/lifecycle.js keeps it current)."""
    return render_template("session.html", life=lifecycle(g.account()))


@bp.get("/api/lifecycle")
def lifecycle_json():
    """Describe the person's token lifecycle for the session page; times only, never a token.

    Polling this goes through the before-request hook like any request, so when the access token
    is due, this very request refreshes it, and the answer shows that refresh.
    """
    if g.user is None:
        abort(401)
    return jsonify(lifecycle(g.account()))


@bp.get("/devices")
@login_required
def devices():
    now = utcnow()
    live = sorted((s for s in g.account().sessions if s.expires_at > now), key=lambda s: s.last_seen_at, reverse=True)
    rows = [{"session": s, "browser": describe_agent(s.user_agent), "this": s.id_hash == g.session.id_hash} for s in live]
    return render_template("devices.html", rows=rows)


@bp.get("/browse")
@login_required
def browse():
    """Show the person's hubs as a tree that static/browse.js fills, level by level, through /api/aps/."""
    return render_template("browse.html", upstream=upstream.api_base() or "", api_prefix=upstream.PREFIX)


# A Model Derivative URN: a version's id, base64url-encoded without padding.
URN = re.compile(r"[A-Za-z0-9_-]{1,800}")
# What it decodes to: urn:adsk.wipprod:fs.file:vf.<lineage>?version=<n> for a Data Management version.
VERSION_ID = re.compile(r"urn:[A-Za-z0-9._:-]+(?:\?version=(\d{1,9}))?")


@bp.get("/viewer")
@login_required
def viewer():
    """Show how a browser-side viewer gets and renews its narrow token from /api/viewer-token, and which file it shows."""
    config = current_app.config
    aps = config["OAUTH_PROVIDER"] == "autodesk"
    urn = request.args.get("urn")
    shown = viewed_file(urn, request.args.get("project", "")) if urn is not None else None
    html = render_template(
        "viewer.html",
        aps=aps,
        aps_js=APS_VIEWER_JS,
        aps_css=APS_VIEWER_CSS,
        urn=urn if aps and shown else "",
        shown=shown,
        viewer_scope=config["OAUTH_VIEWER_SCOPE"],
        by_authorization=config["OAUTH_VIEWER_TOKEN"] == "authorize",
        full_scope=config["OAUTH_SCOPES"],
        leeway=config["TOKEN_REFRESH_LEEWAY"],
    )
    response = Response(html)
    if aps:
        # Only this page runs Autodesk's code; the app's strict policy (set by default) holds everywhere else.
        response.headers["Content-Security-Policy"] = APS_VIEWER_CSP
    return response


def viewed_file(urn: str, project: str) -> dict:
    """Check a viewer link's URN and name the file version it stands for; a malformed link is a 400."""
    try:
        version_id = base64.urlsafe_b64decode(urn + "=" * (-len(urn) % 4)).decode("ascii") if URN.fullmatch(urn) else ""
    except (binascii.Error, UnicodeDecodeError):
        version_id = ""
    found = VERSION_ID.fullmatch(version_id)
    if found is None:
        abort(400, "This viewer link's urn is not the URN of a model: open the file again from Your hubs.")
    if project and not upstream.SEGMENT.fullmatch(project):
        abort(400, "This viewer link's project is not a project id: open the file again from Your hubs.")
    version = found.group(1)
    return {"version_id": version_id, "version": int(version) if version else None, "name": _version_name(version_id, project)}


def _version_name(version_id: str, project: str) -> str | None:
    """Ask the Data Management API for the version's file name, through the person's token; None if it cannot say."""
    base = upstream.api_base()
    if not (base and project and ":fs.file:vf." in version_id):
        return None
    # A version's item (its lineage) is named like the version: fs.file:vf.<id>?version=<n> -> dm.lineage:<id>.
    item = version_id.partition("?")[0].replace(":fs.file:vf.", ":dm.lineage:")
    url = f"{base}/data/v1/projects/{project}/items/{item}/versions"
    try:
        answer = bearer.call_with_access_token(g.account(), lambda token: upstream.fetch(url, token), trigger=f"GET {request.path}")
        listed = json.loads(answer.body or b"{}").get("data", []) if answer.status == 200 else []
    except (upstream.UpstreamFailed, ValueError, AttributeError):
        return None
    names = [v.get("attributes", {}).get("displayName") for v in listed if isinstance(v, dict) and v.get("id") == version_id]
    return names[0] if names and isinstance(names[0], str) else None


def lifecycle(user: User) -> dict:
    """Return the times that keep the person signed in, as seconds from now and ISO instants."""
    now = utcnow()
    leeway = current_app.config["TOKEN_REFRESH_LEEWAY"]
    recent = events.recent(user.id, RECENT_REFRESHES)
    access_issued = events.last_issued(user, "access")
    viewer_issued = events.last_issued(user, "viewer")
    sessions = db.session.execute(select(func.count()).where(UserSession.user_id == user.id, UserSession.expires_at > now)).scalar_one()

    def since(moment: datetime | None) -> float | None:
        return None if moment is None else round((now - moment).total_seconds(), 1)

    def until(moment: datetime | None) -> float | None:
        return None if moment is None else round((moment - now).total_seconds(), 1)

    access_refresh_at = user.access_expires_at - timedelta(seconds=leeway) if user.access_expires_at else None
    here = g.session
    here_since = None if here is None else db.session.execute(select(UserSession.created_at).where(UserSession.id_hash == here.id_hash)).scalar_one_or_none()
    refreshes_here = _silent_refreshes(user, here_since)
    # The person's latest sign-in may have been on another device: each sign-in there shows here too.
    elsewhere = here_since is not None and user.signed_in_at is not None and here_since < user.signed_in_at - timedelta(seconds=1)
    return {
        "now": _iso(now),
        "leeway_seconds": leeway,
        "person": {"name": user.name, "email": user.email},
        "signed_in_at": _iso(user.signed_in_at),
        "signed_in_ago": since(user.signed_in_at),
        "signed_in_elsewhere": elsewhere,
        "here_signed_in_ago": since(here_since),
        "sessions": sessions,
        "access": {
            "issued_ago": since(access_issued),
            "expires_at": _iso(user.access_expires_at),
            "expires_in": until(user.access_expires_at),
            "refresh_at": _iso(access_refresh_at),
            "refresh_in": until(access_refresh_at),
        },
        "refresh": {
            "issued_at": _iso(user.refresh_issued_at),
            "age": since(user.refresh_issued_at),
            "expires_at": _iso(user.refresh_expires_at),
            "expires_in": until(user.refresh_expires_at),
            "lifetime": int(REFRESH_TOKEN_LIFETIME.total_seconds()),
            # Rotations of the current refresh token, issued by the latest sign-in on any device (the viewer token's refresh counts).
            "rotations": user.refresh_rotations,
            # What the session page counts: silent refreshes since this device signed in, whichever device caused them.
            "refreshes_here": refreshes_here,
            "last_rotation": _last_rotation(recent),
        },
        "viewer": {
            "issued_ago": since(viewer_issued) if user.viewer_expires_at else None,
            "expires_at": _iso(user.viewer_expires_at),
            "expires_in": until(user.viewer_expires_at),
            "scope": user.viewer_scope or "",
        },
        "refreshes": [
            {
                "id": e.id,
                "at": _iso(e.at),
                "ago": since(e.at),
                "kind": e.kind,
                "outcome": e.outcome,
                "trigger": e.trigger,
                "ahead": events.ahead(e),
                "waiters": e.waiters,
                "duration_ms": e.duration_ms,
            }
            for e in recent
        ],
    }


def _silent_refreshes(user: User, since: datetime | None) -> int:
    """Count the refreshes since a moment that were no part of a sign-in: each one rotated the person's refresh token."""
    if since is None:
        return 0
    query = select(func.count()).where(
        RefreshEvent.user_id == user.id,
        RefreshEvent.outcome == events.Outcome.REFRESHED,
        RefreshEvent.at >= since,
        RefreshEvent.trigger.not_like(f"%{events.AT_SIGN_IN}"),
    )
    return db.session.execute(query).scalar_one()


def _last_rotation(recent: list[RefreshEvent]) -> str:
    """Say which refresh last rotated the refresh token: right after sign-in it is the viewer token's."""
    last = next((e for e in recent if e.outcome == events.Outcome.REFRESHED), None)
    if last is None:
        return ""
    if events.at_sign_in(last):
        return "Last: the viewer token's refresh at sign-in."
    return f"Last: the {last.kind} token's refresh, by {last.trigger}."


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat(timespec="seconds")


BROWSERS = [
    ("Edge", r"Edg(?:e|A|iOS)?/(\d+)"),
    ("Opera", r"OPR/(\d+)"),
    ("Headless Chrome", r"HeadlessChrome/(\d+)"),
    ("Chrome", r"(?:Chrome|CriOS)/(\d+)"),
    ("Firefox", r"(?:Firefox|FxiOS)/(\d+)"),
    ("Safari", r"Version/(\d+).*Safari/"),
    ("curl", r"^curl/(\d+)"),
    ("Python requests", r"python-requests/(\d+)"),
    ("Werkzeug test client", r"Werkzeug/(\d+)"),
]
SYSTEMS = [
    ("Android", "Android"),
    ("iPhone", "iOS"),
    ("iPad", "iPadOS"),
    ("Windows", "Windows"),
    ("Mac OS X", "macOS"),
    ("CrOS", "ChromeOS"),
    ("Linux", "Linux"),
]


def describe_agent(user_agent: str) -> str:
    """Name the browser and system in a User-Agent header, such as "Firefox 133 on Windows"."""
    browser = next((f"{name} {m.group(1)}" for name, pattern in BROWSERS if (m := re.search(pattern, user_agent))), "Unknown browser")
    system = next((label for marker, label in SYSTEMS if marker in user_agent), "")
    return f"{browser} on {system}" if system else browser


@bp.app_template_filter("duration")
def duration(seconds: float | None) -> str:
    """Say a number of seconds the way a person would: "45 s", "4 min 5 s", "14 d 23 h"."""
    if seconds is None:
        return "–"
    s = int(max(0, seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


@bp.app_template_filter("clock")
def clock(moment: datetime | str | None) -> str:
    """Show an instant as a UTC time of day with its date."""
    if moment is None:
        return "–"
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    return moment.astimezone(UTC).strftime("%d %b %Y, %H:%M:%S UTC")
