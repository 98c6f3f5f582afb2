"""Fixtures: an app on an empty, migrated database (SQLite and PostgreSQL), its client, and sign-in helpers."""

import contextlib
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest
from alembic.script import ScriptDirectory
from flask_migrate import upgrade
from psycopg import sql
from sqlalchemy import text
from sqlalchemy.orm import undefer_group
from werkzeug.serving import make_server

from app import MIGRATIONS, create_app
from models import User, db, utcnow
from standin import create_app as create_standin
from standin.store import Store

PG_ADMIN = os.environ.get("TEST_POSTGRES_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
ISSUER = "http://localhost/standin"
# The revision a migrated test database is at.
HEAD = ScriptDirectory(MIGRATIONS).get_current_head()


def pg_available() -> bool:
    try:
        psycopg.connect(PG_ADMIN, connect_timeout=3).close()
        return True
    except psycopg.OperationalError:
        return False


@contextlib.contextmanager
def fresh_postgres_database(prefix: str) -> Iterator[str]:
    """Create a PostgreSQL database of its own and drop it afterwards; skip (fail in CI) without a server."""
    if not pg_available():
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN}, and CI must test on it")
        pytest.skip("PostgreSQL is not reachable")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """One PostgreSQL database for this test run, migrated once; each test empties it (database_url)."""
    with fresh_postgres_database("signin_test") as url:
        migrate_database(url)
        yield url


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory) -> Path:
    """One SQLite database for this test run, migrated once; each test gets a copy of the file."""
    path = tmp_path_factory.mktemp("sqlite-template") / "app.sqlite"
    migrate_database(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def standin_template(tmp_path_factory) -> Path:
    """One empty stand-in database for this test run; each test's embedded stand-in starts from a copy.

    Creating its tables in a new SQLite file costs tens of milliseconds (a sync per table), copying one
    a fraction of one.
    """
    path = tmp_path_factory.mktemp("standin-template") / "standin.sqlite"
    Store(f"sqlite:///{path}").engine.dispose()
    return path


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    """Give each test an empty, migrated database: a copy of the run's SQLite file, or the run's PostgreSQL database emptied."""
    if request.param == "sqlite":
        path = tmp_path / "app.sqlite"
        copy_private(request.getfixturevalue("sqlite_template"), path)
        return f"sqlite:///{path}"
    url = request.getfixturevalue("pg_database")
    empty_postgres(url)
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database_url(request, tmp_path) -> Iterator[str]:
    """Give a test a database with no schema at all, for tests of the migrations themselves."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'app.sqlite'}"
        return
    with fresh_postgres_database("signin_empty") as url:
        yield url


def migrate_database(url: str) -> None:
    """Build a database's schema by running the migrations, so the migrations are what every test runs on."""
    with tempfile.TemporaryDirectory() as folder:  # the embedded stand-in's file, out of the test's way
        app = create_app(make_config(Path(folder), url))
        migrate_fresh(app)
        close_app(app)
    if url.startswith("postgresql"):
        with psycopg.connect(url.replace("+psycopg", "")) as conn:
            MIGRATED_SCHEMAS[url] = schema_of(conn)


def copy_private(source: Path, target: Path) -> None:
    """Copy a SQLite file into a new file readable by its owner only, as the app creates its own."""
    with open(source, "rb") as original, os.fdopen(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as copy:
        shutil.copyfileobj(original, copy)


def empty_postgres(url: str) -> None:
    """Delete every row and restart every sequence; migrate again if a test changed the schema or its revision.

    DELETE on these few small tables takes a few milliseconds where TRUNCATE takes tens (it makes new
    files for each table), and migrating from empty takes longer still.
    """
    # A test that left a transaction open holding row locks fails the next one here, not hangs it.
    with psycopg.connect(url.replace("+psycopg", ""), autocommit=True, options="-c lock_timeout=10s") as conn:
        if at_head(conn) and schema_of(conn) == MIGRATED_SCHEMAS.get(url):
            with conn.transaction():
                for table in reversed(db.metadata.sorted_tables):  # rows that point at others go first
                    conn.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(table.name)))
                for (sequence,) in conn.execute("SELECT sequencename FROM pg_sequences WHERE schemaname = 'public'").fetchall():
                    conn.execute(sql.SQL("ALTER SEQUENCE {} RESTART").format(sql.Identifier(sequence)))
            return
    migrate_database(url)


def at_head(conn: psycopg.Connection) -> bool:
    try:
        return conn.execute("SELECT version_num FROM alembic_version").fetchall() == [(HEAD,)]
    except psycopg.errors.UndefinedTable:
        return False


# Tests inject faults by changing the schema (a check constraint that refuses rows, a dropped index).
SCHEMA = """
SELECT md5(coalesce(string_agg(item, '; ' ORDER BY item), '')) FROM (
    SELECT format('column %s.%s %s %s %s', table_name, column_name, data_type, is_nullable, column_default) AS item
        FROM information_schema.columns WHERE table_schema = 'public'
    UNION ALL SELECT 'index ' || indexdef FROM pg_indexes WHERE schemaname = 'public'
    UNION ALL SELECT format('constraint %s %s %s', conrelid::regclass, conname, pg_get_constraintdef(oid))
        FROM pg_constraint WHERE connamespace = 'public'::regnamespace
    UNION ALL SELECT format('trigger %s %s', tgrelid::regclass, tgname)
        FROM pg_trigger JOIN pg_class ON pg_class.oid = tgrelid WHERE relnamespace = 'public'::regnamespace AND NOT tgisinternal
    UNION ALL SELECT 'function ' || oid::regprocedure FROM pg_proc WHERE pronamespace = 'public'::regnamespace
) AS schema
"""
# Each run's PostgreSQL database: its schema as the migrations built it.
MIGRATED_SCHEMAS: dict[str, str] = {}


def schema_of(conn: psycopg.Connection) -> str:
    """Return a digest of the public schema: columns, indexes, constraints, triggers and functions."""
    return conn.execute(SCHEMA).fetchone()[0]


def make_config(tmp_path, database_url: str, **overrides) -> dict:
    config = {
        "TESTING": True,
        "SECRET_KEY": "test-secret",
        "SQLALCHEMY_DATABASE_URI": database_url,
        "OAUTH_PROVIDER": "standin",
        "OAUTH_ISSUER": ISSUER,
        "OAUTH_CLIENT_ID": "standin-client",
        "OAUTH_CLIENT_SECRET": "standin-secret",
        "SESSION_COOKIE_SECURE": False,
        "TOKEN_ENCRYPTION_KEYS": "8dPAA3qIkpHyELgsyIDmxI0ZBvP5jsC5Ys2yLAOFb3g=",
        "STANDIN_DATABASE_URL": f"sqlite:///{tmp_path / 'standin.sqlite'}",
        "STANDIN_STRICT": True,
        "PROVIDER_TIMEOUT": 2,
        "PROVIDER_REFRESH_TIMEOUT": 2,
    }
    config.update(overrides)
    return config


@contextlib.contextmanager
def standin_over_http(tmp_path, wrap=lambda provider: provider) -> Iterator[tuple[str, object, object]]:
    """Serve a stand-in over real HTTP as a separate OpenID Connect provider, wrapped as a test wants.

    Yield its issuer, its store (count refreshes, inject faults) and the WSGI app served (the wrapper).
    """
    server = make_server("127.0.0.1", 0, None, threaded=True)
    issuer = f"http://127.0.0.1:{server.server_port}"
    provider = create_standin(
        {
            "issuer": issuer,
            "clients": {"oidc-client": "oidc-secret"},
            "redirect_uris": ["http://localhost/auth/callback"],
            "database_url": f"sqlite:///{tmp_path / 'oidc.sqlite'}",
            "access_ttl": 3599,
            "strict": True,
        }
    )
    server.app = wrap(provider)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield issuer, provider.extensions["standin_store"], server.app
    finally:
        server.shutdown()
        thread.join()


def close_databases(app) -> None:
    """Close this app's pooled connections: the session's, and those of every engine (the hook's "reads" too)."""
    with app.app_context():
        db.session.remove()
        for engine in db.engines.values():
            engine.dispose()


def migrate_fresh(app) -> None:
    """Build the app's schema from empty by running the migrations."""
    with app.app_context():
        if db.engine.dialect.name == "postgresql":
            with db.engine.begin() as conn:
                conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
        upgrade()
    close_databases(app)


@pytest.fixture
def app_factory(tmp_path, database_url, standin_template, monkeypatch):
    """Create apps on this test's database; several may share it, like instances behind a balancer."""
    copy_private(standin_template, tmp_path / "standin.sqlite")  # the embedded stand-in's (make_config)
    for name in list(os.environ):
        if name.startswith(("OAUTH_", "APS_", "STANDIN_", "TOKEN_", "DATABASE_URL", "SECRET_KEY", "APP_ENV", "SESSION_COOKIE")):
            monkeypatch.delenv(name)
    made = []

    def make(**overrides):
        app = create_app(make_config(tmp_path, database_url, **overrides))
        made.append(app)
        return app

    yield make
    for app in made:
        close_app(app)


def close_app(app) -> None:
    """Close an app's pooled connections, its embedded stand-in's included."""
    close_databases(app)
    if "standin" in app.extensions:
        # Close its pooled SQLite connections now: Python 3.13 warns about each one left to the collector.
        app.extensions["standin"].extensions["standin_store"].engine.dispose()


@pytest.fixture
def app(app_factory):
    return app_factory()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def standin(app):
    """The embedded stand-in provider's store: count refreshes, inject faults."""
    return app.extensions["standin"].extensions["standin_store"]


def sign_in(client, name: str = "Ada Lovelace", next_path: str | None = None):
    """Go through the whole sign-in flow against the embedded stand-in; return the final response."""
    login = client.get("/auth/login", query_string={"next": next_path} if next_path else None)
    assert login.status_code == 302, login.status_code
    authorize = urlsplit(login.headers["Location"])
    page = client.get(authorize.path, query_string=authorize.query)
    assert page.status_code == 200, page.get_data(as_text=True)
    consent = client.post(authorize.path, query_string=authorize.query, data={"name": name})
    assert consent.status_code == 302
    back = urlsplit(consent.headers["Location"])
    return client.get(back.path, query_string=back.query)


def callback_params(location: str) -> dict:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def expire_access_token(app, name: str = "Ada Lovelace", field: str = "access_expires_at") -> None:
    """Make the stored access token count as expired, as if its hour had passed."""
    with app.app_context():
        user = db.session.execute(db.select(User).where(User.name == name)).scalar_one()
        setattr(user, field, utcnow() - timedelta(seconds=1))
        db.session.commit()


def stored_user(app, name: str = "Ada Lovelace") -> User | None:
    with app.app_context():
        user = db.session.execute(db.select(User).where(User.name == name).options(undefer_group("tokens"))).scalar_one_or_none()
        if user is not None:
            db.session.expunge(user)
        return user


@pytest.fixture
def standin_for():
    """Return the embedded stand-in's store of an app made by app_factory."""
    return lambda app: app.extensions["standin"].extensions["standin_store"]


@pytest.fixture(scope="module")
def postgres_server() -> Iterator:
    """A PostgreSQL server of the module's own (tests/pgserver.py), for tests that stop or restart it."""
    from pgserver import PostgresServer

    server = PostgresServer().start()
    yield server
    server.destroy()


@pytest.fixture
def own_postgres(postgres_server):
    """The module's own PostgreSQL server, running when the test starts; tests that use it build their schema from empty."""
    if not postgres_server.running:
        postgres_server.start()  # a test that failed while the server was stopped left it so
    return postgres_server


@pytest.fixture(scope="module")
def chromium():
    """Debian's Chromium under Playwright for one test module; closed at its end, since one thread runs one Playwright at a time."""
    from browser_server import CHROMIUM, launch_chromium, playwright_session

    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing, and CI must run the browser tests")
        pytest.skip(f"{CHROMIUM} is missing")
    with playwright_session() as playwright:
        browser = launch_chromium(playwright)
        yield browser
        browser.close()


# What one test process takes of PostgreSQL's connections, with room to spare: about 25 at its busiest
# (instances of 3 gunicorn workers x 4 threads, or threads racing for a refresh).
CONNECTIONS_PER_PROCESS = 50


@pytest.hookimpl(optionalhook=True)  # pytest -p no:xdist runs without it
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """Under `-n auto` (bash scripts/test): TEST_PROCESSES, or 4 processes, fewer where PostgreSQL takes too few connections for them.

    Most of the slow tests wait (for real expiries, restarts, browsers), so 4 processes keep 2 cores busy.
    """
    if os.environ.get("TEST_PROCESSES"):
        processes = int(os.environ["TEST_PROCESSES"])
    else:
        try:
            with psycopg.connect(PG_ADMIN, connect_timeout=3) as conn:
                processes = min(4, int(conn.execute("SHOW max_connections").fetchone()[0]) // CONNECTIONS_PER_PROCESS)
        except psycopg.OperationalError:
            processes = 4  # no PostgreSQL: its tests skip
    return processes if processes > 1 else 0


# The servers a module starts once for its tests (module-scoped fixtures, or session-scoped ones of its own).
SHARED_SCOPES = {"class", "module", "package"}
HEAVY = ("slow", "browser", "interop")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under `-n N --dist loadgroup`: keep tests that share a module's servers on one worker, and start the heavy ones first.

    The rest go to whichever worker is free, one test at a time, so the long waits of the servers'
    tests (real expiries, real restarts) overlap with everything else.
    """
    for item in items:
        group = shared_servers(item)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=lambda item: not (item.get_closest_marker("xdist_group") or any(item.get_closest_marker(m) for m in HEAVY)))


def shared_servers(item: pytest.Item) -> str | None:
    """Name the module, and the parameters of its shared fixtures, whose servers this test uses; None if it starts its own."""
    module = item.nodeid.split("::")[0]
    shared = [
        defs[-1]
        for defs in item._fixtureinfo.name2fixturedefs.values()
        if defs[-1].scope in SHARED_SCOPES or (defs[-1].scope == "session" and defs[-1].baseid == module)
    ]
    if not shared:
        return None
    params = getattr(item, "callspec", None)
    shown = [str(params.params[d.argname]) for d in shared if params and d.argname in params.params]
    return "-".join([module, *sorted(shown)])
