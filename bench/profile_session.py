"""Profile GET /api/session in-process (Flask test client, pyinstrument): where does the hook's time go?

The test client leaves out gunicorn and the network, so the time per request here is the app's
own work: the part of the hook overhead that code changes can remove.
"""

import time
from pathlib import Path
from urllib.parse import urlsplit

from common import database

TEST_KEY = "8dPAA3qIkpHyELgsyIDmxI0ZBvP5jsC5Ys2yLAOFb3g="

# Where time is attributed: (label, file suffix, function name), checked innermost first.
PARTS = [
    ("decrypt tokens (Fernet)", "models.py", "process_result_value"),
    ("session query (SELECT ... JOIN)", "sessions.py", "load"),
    ("touch last-seen", "sessions.py", "touch"),
    ("csrf.protect", "csrf.py", "protect"),
    ("freshness check", "tokens.py", "is_stale"),
    ("request teardown (session remove/rollback)", "flask_sqlalchemy/session.py", "_app_ctx_id"),
    ("load_person: lazy load of session.user", "sqlalchemy/orm/attributes.py", "__get__"),
    ("load_person: rest", "app.py", "load_person"),
    ("view /api/session", "api.py", "session"),
    ("size and rate checks", "limits.py", "check_size"),
    ("security headers", "app.py", "security_headers"),
]


def make_app(url: str, folder: Path):
    """Create the app the way a deployment would, on a fresh migrated database."""
    from flask_migrate import upgrade

    from app import create_app
    from models import db

    app = create_app(
        {
            "SECRET_KEY": "bench-secret",
            "SQLALCHEMY_DATABASE_URI": url,
            "OAUTH_PROVIDER": "standin",
            "OAUTH_ISSUER": "http://localhost/standin",
            "OAUTH_CLIENT_ID": "standin-client",
            "OAUTH_CLIENT_SECRET": "standin-secret",
            "SESSION_COOKIE_SECURE": False,
            "TOKEN_ENCRYPTION_KEYS": TEST_KEY,
            "STANDIN_DATABASE_URL": f"sqlite:///{folder / 'standin-profile.sqlite'}",
            "SIGNIN_RATE_LIMIT": "off",
        }
    )
    with app.app_context():
        upgrade()
        db.engine.dispose()
    return app


def sign_in(client, name: str = "Ada Lovelace") -> None:
    """Go through the sign-in flow against the embedded stand-in."""
    login = client.get("/auth/login")
    authorize = urlsplit(login.headers["Location"])
    client.get(authorize.path, query_string=authorize.query)
    consent = client.post(authorize.path, query_string=authorize.query, data={"name": name})
    back = urlsplit(consent.headers["Location"])
    assert client.get(back.path, query_string=back.query).status_code == 302


def per_request(client, path: str, count: int) -> float:
    """Return the mean seconds per request of count GETs of path."""
    started = time.perf_counter()
    for _ in range(count):
        response = client.get(path, headers={"Accept": "application/json"})
        assert response.status_code == 200, response.status_code
    return (time.perf_counter() - started) / count


def count_statements(app, client, path: str, count: int) -> dict[str, float]:
    """Count the SQL statements the app sends per request, by their first word."""
    from sqlalchemy import event

    from models import db

    seen: dict[str, int] = {}

    def note(conn, cursor, statement, parameters, context, executemany) -> None:
        word = statement.split(None, 1)[0].upper()
        seen[word] = seen.get(word, 0) + 1

    with app.app_context():
        engines = list(db.engines.values())  # the hook's "reads" engine too
    for engine in engines:
        event.listen(engine, "before_cursor_execute", note)
    try:
        per_request(client, path, count)
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", note)
    return {word: n / count for word, n in seen.items()}


def breakdown(app, client, count: int) -> dict[str, float]:
    """Time the pieces of the hook one by one, without a profiler's overhead (microseconds each)."""
    from flask import g

    import app as app_module
    import sessions
    from models import db

    cookie = client.get_cookie("session").value
    cipher = app.extensions["token_cipher"]

    def timed(fn) -> float:
        fn()
        started = time.perf_counter()
        for _ in range(count):
            fn()
        return (time.perf_counter() - started) / count * 1e6

    with app.test_request_context("/api/session", headers={"Cookie": f"session={cookie}", "Accept": "application/json"}):
        raw = db.session.connection().exec_driver_sql("SELECT access_token FROM users LIMIT 1").scalar_one()
        db.session.rollback()

        def whole_hook() -> None:
            app_module.load_person()
            assert g.user is not None
            db.session.rollback()

        def load_only() -> None:
            assert sessions.load() is not None

        return {
            "load_person (whole hook)": timed(whole_hook),
            "sessions.load() alone": timed(load_only),
            "cookie unsign + sha256": timed(lambda: sessions.hash_id(sessions._signer().unsign(cookie).decode())),
            "one Fernet decrypt": timed(lambda: cipher.decrypt(raw.encode())),
        }


def attribute(root) -> dict[str, float]:
    """Sum the profile's time per part, counting each frame under its innermost matching part."""
    totals: dict[str, float] = {}

    def walk(frame, inside: str | None) -> None:
        label = inside
        for name, suffix, function in PARTS:
            if frame.function == function and (frame.file_path or "").endswith(suffix):
                label = name
                break
        # Self time of this frame goes to the innermost part around it.
        own = frame.time - sum(child.time for child in frame.children)
        key = label or "other (Flask, Werkzeug test client)"
        totals[key] = totals.get(key, 0.0) + own
        for child in frame.children:
            walk(child, label)

    walk(root, None)
    return totals


def run(kind: str, folder: Path, quick: bool) -> dict:
    """Profile /api/session and time it against /healthz in-process on a fresh database of this kind."""
    from pyinstrument import Profiler

    count = 500 if quick else 3000
    with database(kind, folder, "bench_profile") as url:
        app = make_app(url, folder)
        client = app.test_client()
        sign_in(client)
        per_request(client, "/api/session", 50)  # warm caches and the connection pool
        statements = count_statements(app, client, "/api/session", 20)
        pieces = breakdown(app, client, count)
        per_request(client, "/healthz", 50)
        rounds = [(per_request(client, "/healthz", count), per_request(client, "/api/session", count)) for _ in range(3)]
        profiler = Profiler(interval=0.0002)
        profiler.start()
        per_request(client, "/api/session", count)
        profiler.stop()
        text = profiler.output_text(unicode=False, color=False, show_all=False)
        (folder / f"profile-session-{kind}.txt").write_text(text)
        (folder / f"profile-session-{kind}.html").write_text(profiler.output_html())
        session = profiler.last_session
        parts = attribute(profiler.last_session.root_frame())
        with app.app_context():
            from models import db

            for engine in db.engines.values():
                engine.dispose()
    healthz = sorted(r[0] for r in rounds)[1]
    api = sorted(r[1] for r in rounds)[1]
    total = session.duration
    return {
        "database": kind,
        "requests": count,
        "healthz_us": healthz * 1e6,
        "session_us": api * 1e6,
        "in_process_ratio": healthz / api,
        "sql_statements_per_request": statements,
        "hook_pieces_us": pieces,
        "parts_us_per_request": {k: v / count * 1e6 for k, v in sorted(parts.items(), key=lambda kv: -kv[1])},
        "profiled_us_per_request": total / count * 1e6,
        "profile_text": str(folder / f"profile-session-{kind}.txt"),
    }
