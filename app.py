"""The application factory: configuration, extensions, blueprints and the sign-in hook."""

import contextlib
import os
import select
import sqlite3
from http.cookiejar import DefaultCookiePolicy
from urllib.parse import urlsplit

import psycopg
import requests
from cryptography.fernet import Fernet, MultiFernet
from flask import Flask, Response, current_app, g, jsonify, redirect, render_template, request, url_for
from flask_migrate import Migrate
from sqlalchemy import Dialect, event, make_url
from sqlalchemy.exc import InterfaceError, InvalidatePoolError, OperationalError, SQLAlchemyError
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.middleware.proxy_fix import ProxyFix

import api
import auth
import backchannel
import config
import csrf
import health
import housekeeping
import keys
import limits
import locking
import logs
import metrics
import pages
import policy
import proxy
import sessions
import signout
import standin
import tokens
from grants import SignInRequired
from locking import LockTimeout
from models import db
from provider import BackChannel, Provider, ProviderError, ProviderRejected, TokenRefused, aps_endpoints, discover
from redirects import safe_next
from standin.inprocess import WSGIAdapter
from standin.store import private_sqlite_file

MIGRATIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "migrations")
# Where Flask puts this app's instance folder (development secrets, SQLite files).
INSTANCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "instance")
migrate = Migrate()
DATABASE_SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg")


def create_app(test_config: dict | None = None) -> Flask:
    """Create the app; a configuration error stops start-up with one sentence naming the variable."""
    app = Flask(__name__, instance_relative_config=True)
    app.app_ctx_globals_class = sessions.RequestState
    try:
        app.config.update(load_config(app.instance_path, test_config))
        app.extensions["token_cipher"] = _cipher(app.config["TOKEN_ENCRYPTION_KEYS"])
        _init_database(app)
        locking.init_app(app)
        _init_provider(app)
        _trust_proxies(app)
        limits.init_app(app)  # before load_person: a refused request costs no database work
    except config.ConfigError as exc:
        raise SystemExit(f"Configuration error: {exc}") from None

    logs.init_app(app)

    # Sessions are this app's own (sessions.py): Flask's cookie session would only cost every request
    # a look at the cookie (and, named "session" like ours in development, a failed signature check).
    app.session_interface = sessions.NoFlaskSession()
    # Browsers ask every site for /favicon.ico: a static file like the others, at the root.
    app.add_url_rule("/favicon.ico", endpoint="static", defaults={"filename": "favicon.ico"})
    _serve_static_without_session(app)
    app.register_blueprint(pages.bp)
    app.register_blueprint(auth.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(proxy.bp)
    app.register_blueprint(backchannel.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(metrics.bp)
    app.before_request(load_person)
    app.after_request(security_headers)
    app.after_request(sessions.update_cookie)
    signout.init_app(app)
    app.register_error_handler(SignInRequired, sign_in_required)
    app.register_error_handler(ProviderError, provider_unavailable)
    app.register_error_handler(ProviderRejected, provider_refused)
    app.register_error_handler(LockTimeout, lock_timeout)
    app.register_error_handler(HTTPException, http_error)
    # A connection refused or cut (a restart) is an outage, not a bug: other database errors stay 500s.
    app.register_error_handler(OperationalError, database_unavailable)
    app.register_error_handler(InterfaceError, database_unavailable)
    app.jinja_env.globals["csrf_token"] = csrf.token
    app.cli.add_command(keys.rotate_token_keys)
    app.cli.add_command(housekeeping.purge)
    return app


def load_config(instance_path: str = INSTANCE, test_config: dict | None = None) -> dict:
    """Read and check every setting without starting anything; a bad one raises ConfigError naming the variable.

    gunicorn.conf.py runs this in the master, so a bad setting stops gunicorn instead of crashing each worker.
    """
    settings = config.load(os.environ, instance_path)
    if test_config:
        settings.update(test_config)
    config.check(settings)
    _cipher(settings["TOKEN_ENCRYPTION_KEYS"])
    if urlsplit(settings["SQLALCHEMY_DATABASE_URI"]).scheme not in DATABASE_SCHEMES:
        raise config.ConfigError("DATABASE_URL must be a sqlite:/// or postgresql+psycopg:// URL.")
    return settings


def load_person() -> Response | None:
    """Resolve the session cookie to a person and make sure their access token is fresh, as the view's policy says."""
    g.reset()
    rules = policy.current()
    if not rules.reads_session:
        return None
    found = sessions.load()
    if found is not None:
        g.cookie_session, person = found
        if sessions.is_live(g.cookie_session):
            g.session, g.user = g.cookie_session, person
        elif rules.refreshes and request.method == "GET" and not policy.answers_json() and current_app.config["SILENT_SIGN_IN"]:
            # The grant behind it died: a page goes through the provider again, silently if it can. The
            # cookie stays: it is what lets the sign-in be silent (auth.login).
            return redirect(url_for("auth.login", next=safe_next(request.full_path.rstrip("?")), silent=1))
    elif request.cookies.get(sessions.cookie_name()):
        g.cookie = sessions.Cookie.DROP  # tampered or unknown: simply signed out
        if sessions.issued_here():
            g.sign_out_reason = "elsewhere"  # a sign-out on another device (or at the provider) ended it: say so
    if g.session is not None and rules.keeps_alive:
        sessions.touch(g.session)
    csrf.protect()
    if g.user is not None and rules.refreshes:
        g.account_row = tokens.refresh_if_due(g.user, trigger=f"{request.method} {request.path}")
    return None


def _serve_static_without_session(app: Flask) -> None:
    serve = app.send_static_file

    @policy.no_session
    def static(filename: str) -> Response:
        return serve(filename)

    app.view_functions["static"] = static


def security_headers(response: Response) -> Response:
    headers = response.headers
    headers.setdefault(
        "Content-Security-Policy", "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )
    headers["X-Content-Type-Options"] = "nosniff"
    headers["X-Frame-Options"] = "DENY"
    headers["Referrer-Policy"] = "no-referrer"
    # Other sites may neither embed our responses (a viewer token as a script) nor keep a handle on our windows.
    headers["Cross-Origin-Resource-Policy"] = "same-origin"
    headers["Cross-Origin-Opener-Policy"] = "same-origin"
    if request.endpoint != "static":
        # Pages and API answers carry personal data or tokens: never cache them.
        headers["Cache-Control"] = "no-store"
    if current_app.config["SESSION_COOKIE_SECURE"]:
        headers["Strict-Transport-Security"] = "max-age=31536000; includeSubDomains"
    return response


def sign_in_required(exc: SignInRequired) -> Response:
    """Send a person whose grant died back through sign-in (silently when the provider can), then to the same page."""
    db.session.rollback()
    if g.session is not None:
        # No live orphan: a session left live would count as "still signed in here" at a later sign-out.
        sessions.expire(g.session.id_hash)
        db.session.commit()
        g.session = None
    if exc.notice:
        g.cookie = sessions.Cookie.DROP  # the person should read why, not be signed in again unawares
        return _sign_in_again(exc.notice)
    if policy.answers_json():
        # The cookie stays: the next page this browser opens resumes the sign-in silently.
        return jsonify(error="sign_in_required", message="Your sign-in has ended; please sign in again."), 401
    silent = 1 if request.method == "GET" and current_app.config["SILENT_SIGN_IN"] else None
    if silent is None:
        g.cookie = sessions.Cookie.DROP
    return redirect(url_for("auth.login", next=safe_next(request.full_path.rstrip("?")), silent=silent))


def _sign_in_again(notice: str) -> tuple[Response | str, int]:
    """Say why the sign-in ended, with one link through sign-in back to this page."""
    again = url_for("auth.login", next=safe_next(request.full_path.rstrip("?")))
    g.signed_out()  # their sessions are gone: the page shows them signed out
    if policy.answers_json():
        return jsonify(error="sign_in_required", message=notice, sign_in=again), 401
    return render_template("error.html", title="Please sign in again", detail=notice, retry=again), 401


def provider_unavailable(exc: ProviderError) -> tuple[Response | str, int]:
    """Answer 503 and keep the session: the next request tries again."""
    db.session.rollback()
    return _try_again("provider_unavailable", "The sign-in provider is not answering right now; you are still signed in, please try again in a moment.")


def lock_timeout(exc: LockTimeout) -> tuple[Response | str, int]:
    """Answer 503 and keep the session: another request held the person's lock for longer than a refresh may take."""
    return _try_again("refresh_busy", "Your sign-in is still being renewed by another request; you are still signed in, please try again in a moment.")


def database_unavailable(exc: SQLAlchemyError) -> tuple[Response | str, int]:
    """Answer 503 while the database is unreachable or restarting: nothing was lost, the next request tries again."""
    with contextlib.suppress(SQLAlchemyError):
        db.session.rollback()
    g.signed_out()  # the page must not touch the database again to show who is signed in
    current_app.logger.warning("database unavailable: %s", type(getattr(exc, "orig", None) or exc).__name__)
    return _try_again("database_unavailable", "This app cannot reach its database right now; please try again in a moment.")


def _try_again(error: str, message: str) -> tuple[Response | str, int]:
    """Answer 503 saying why, with a link that repeats the request."""
    if policy.answers_json():
        return jsonify(error=error, message=message), 503
    # Only a local path: a crafted one (/%5Chost) would send the person elsewhere.
    retry = safe_next(request.full_path.rstrip("?"))
    return render_template("error.html", title="Please try again in a moment", detail=message, retry=retry), 503


def provider_refused(exc: ProviderRejected) -> tuple[Response | str, int]:
    """Answer 403 naming the provider's refusal, and keep the session: asking again would get the same answer."""
    message = f"The sign-in provider refused to issue this token ({exc.error}); you are still signed in."
    if isinstance(exc, TokenRefused):
        message = f"The API refused this request with your access token ({exc.error}); you are still signed in."
    if policy.answers_json():
        return jsonify(error="provider_refused", cause=exc.error, message=message), 403
    return render_template("error.html", title="The sign-in provider refused this", detail=message, retry=None), 403


def http_error(exc: HTTPException) -> tuple[Response | str, int]:
    if policy.answers_json():
        if exc.code == 401:
            return jsonify(signed_in=False, error="not_signed_in", message="Sign in first."), 401
        return jsonify(error=exc.name.lower().replace(" ", "_"), message=exc.description), exc.code
    return render_template("error.html", title=exc.name, detail=exc.description, retry=None), exc.code


def _cipher(keys: str) -> MultiFernet:
    """Build the token key ring: the first key encrypts, every key decrypts."""
    try:
        return MultiFernet([Fernet(key) for key in keys.replace(",", " ").split()])
    except (ValueError, TypeError):
        raise config.ConfigError("TOKEN_ENCRYPTION_KEYS must hold one or more Fernet keys (urlsafe base64, 32 bytes).") from None


def _init_database(app: Flask) -> None:
    uri = app.config["SQLALCHEMY_DATABASE_URI"]
    options = app.config.setdefault("SQLALCHEMY_ENGINE_OPTIONS", {})
    # Error messages and logs never show bound values: they are token ciphertext and email addresses.
    options.setdefault("hide_parameters", True)
    if uri.startswith("sqlite"):
        # A request waiting for another's refresh (or sign-in, or sign-out) waits for the write lock as long
        # as a refresh may take, then gets a 503 (PostgreSQL's lock_timeout: locking.py).
        options.setdefault("connect_args", {"timeout": locking.lock_wait(app.config)})
        os.makedirs(app.instance_path, exist_ok=True)
        private_sqlite_file(make_url(uri).database)
    else:
        # What a transaction-mode pooler (PgBouncer, RDS Proxy) accepts: no startup options (the lock
        # timeout is set inside the transaction that takes a lock, locking.py) and no server-side prepared
        # statements, which the pooler would send to another server connection.
        # TCP keepalives find a server that vanished without a word (a host lost, a failover) under a pooled
        # connection within about a minute, so the check below replaces it before use.
        keepalives = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}
        # DATABASE_PREPARED_STATEMENTS opts in, for a direct connection only: psycopg's default, a
        # statement prepared on its fifth execution on a connection (bench/run.py --only hook shows the gain).
        prepare = {} if app.config.get("DATABASE_PREPARED_STATEMENTS") else {"prepare_threshold": None}
        options.setdefault("connect_args", {**prepare, **keepalives})
    # The sign-in hook's one read per request runs on an engine of its own in autocommit: no BEGIN
    # before it, no ROLLBACK after it, and a retry instead of a ping (sessions.load). Each thread
    # keeps its own connection to it (sessions._reader): as many as the server has threads.
    binds = app.config.setdefault("SQLALCHEMY_BINDS", {})
    binds.setdefault("reads", {"url": uri, **options, "isolation_level": "AUTOCOMMIT", "max_overflow": -1})
    db.init_app(app)
    migrate.init_app(app, db, directory=MIGRATIONS)
    with app.app_context():
        if uri.startswith("sqlite"):
            event.listen(db.engine, "connect", _sqlite_pragmas)
        else:
            # The rest (refreshes, sign-ins, pages that load the whole person) makes sure a pooled
            # connection still has its server before using it, so the first of them after a database
            # restart does not fail.
            dialect = db.engine.dialect
            event.listen(db.engine, "checkout", lambda dbapi_connection, *_: _replace_if_hung_up(dbapi_connection, dialect))


def _replace_if_hung_up(dbapi_connection: psycopg.Connection, dialect: Dialect) -> None:
    """Ping a pooled PostgreSQL connection only if its socket stirred while it sat idle; if the ping fails, start the pool afresh.

    An idle connection has nothing to read unless its server hung up (a restart, an idle timeout) or,
    rarely, sent a notice, and its socket reports an error once TCP keepalives found the server gone:
    looking costs no round trip, where pinging before every use (pool_pre_ping) costs one on every
    refresh, sign-in and page that loads the whole person.
    """
    try:
        idle = select.poll()
        idle.register(dbapi_connection.fileno(), select.POLLIN)  # errors and hang-ups are reported too
        if idle.poll(0):
            dialect.do_ping(dbapi_connection)
    except psycopg.Error as exc:
        # Every connection as old as this one went with the same server: the pool drops them all and connects afresh.
        raise InvalidatePoolError("the database closed this pooled connection") from exc


def _sqlite_pragmas(dbapi_connection: sqlite3.Connection, _record) -> None:
    dbapi_connection.execute("PRAGMA foreign_keys=ON")
    dbapi_connection.execute("PRAGMA journal_mode=WAL")  # readers go on while a refresh holds the write lock


def _init_provider(app: Flask) -> None:
    cfg = app.config
    http = requests.Session()
    # One client serves everyone: a cookie the provider set while answering for one person would go with the next person's calls.
    http.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
    issuer = cfg["OAUTH_ISSUER"]
    if cfg["OAUTH_BACKCHANNEL_URL"] and cfg["OAUTH_PROVIDER"] != "standin":
        http.mount(f"{issuer}/", BackChannel(issuer, cfg["OAUTH_BACKCHANNEL_URL"]))
    if cfg["OAUTH_PROVIDER"] == "standin":
        embedded = standin.create_app(
            {
                "issuer": issuer,
                "clients": {cfg["OAUTH_CLIENT_ID"]: cfg["OAUTH_CLIENT_SECRET"]},
                "redirect_uris": [cfg["OAUTH_REDIRECT_URI"]] if cfg["OAUTH_REDIRECT_URI"] else [],
                "database_url": cfg["STANDIN_DATABASE_URL"],
                "access_ttl": cfg["STANDIN_ACCESS_TOKEN_TTL"],
                "strict": cfg["STANDIN_STRICT"],
                "narrows_quietly": cfg["STANDIN_NARROWS_QUIETLY"],
                "introspects_access_only": cfg["STANDIN_INTROSPECTS_ACCESS_ONLY"],
                "grant_per_authorization": cfg["STANDIN_GRANT_PER_AUTHORIZATION"],
            }
        )
        mount = urlsplit(issuer).path.rstrip("/")
        if not mount:
            raise config.ConfigError("OAUTH_ISSUER for the stand-in needs a path, such as http://localhost:5000/standin.")
        app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {mount: embedded})
        # Back-channel calls go to the embedded provider in-process: a server calling itself could deadlock.
        http.mount(f"{issuer}/", WSGIAdapter(embedded, issuer))
        app.extensions["standin"] = embedded
        endpoints = aps_endpoints(issuer, cfg["OAUTH_USERINFO_URL"])
    elif cfg["OAUTH_PROVIDER"] == "autodesk":
        endpoints = aps_endpoints(issuer, cfg["OAUTH_USERINFO_URL"])
    else:
        endpoints = discover(issuer, http, cfg["PROVIDER_TIMEOUT"], cfg["OAUTH_USERINFO_URL"], cfg.get("OAUTH_REVOCATION_URL"))
    app.extensions["provider"] = Provider(
        endpoints, cfg["OAUTH_CLIENT_ID"], cfg["OAUTH_CLIENT_SECRET"], cfg["PROVIDER_TIMEOUT"], http, refresh_timeout=cfg["PROVIDER_REFRESH_TIMEOUT"]
    )


def _trust_proxies(app: Flask) -> None:
    """Believe X-Forwarded-For/-Proto/-Host from TRUSTED_PROXY_COUNT proxies, so URLs and client addresses are right behind TLS."""
    hops = app.config["TRUSTED_PROXY_COUNT"]
    if hops:
        # Outermost wrapper: the embedded stand-in and the rate limiter see the fixed values too.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops)
