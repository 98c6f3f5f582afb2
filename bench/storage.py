"""Scale of storage: the hook's session lookup with 1,000 sessions in PostgreSQL and with 1,000,000.

People are created through the app's models (tokens encrypted as in production); the sessions are
bulk-inserted with generate_series, their ids hashed by PostgreSQL with the same SHA-256 the app
uses, so that real signed cookies resolve through sessions.load(), the hook's own code.
"""

import random
import re
import time
from datetime import timedelta

from common import median, percentile, postgres_database
from profile_session import make_app
from sqlalchemy import text

PEOPLE = 1000

INSERT_SESSIONS = """
INSERT INTO user_sessions (id_hash, user_id, user_agent, created_at, last_seen_at, expires_at)
SELECT encode(sha256(convert_to('bench-session-' || i, 'UTF8')), 'hex'),
       1 + i % :people, 'bench', now(), now(), now() + interval '15 days'
FROM generate_series(1, :count) AS i
"""


def fill(app, sessions: int) -> None:
    """Create PEOPLE people with encrypted tokens and `sessions` live sessions spread over them."""
    from models import User, db, utcnow

    with app.app_context():
        now = utcnow()
        for i in range(PEOPLE):
            db.session.add(
                User(
                    subject=f"bench-{i}",
                    name=f"Bench Person {i}",
                    email=f"p{i}@bench.example",
                    access_token=f"access-{i}",
                    access_expires_at=now + timedelta(hours=1),
                    refresh_token=f"refresh-{i}",
                    refresh_expires_at=now + timedelta(days=15),
                    viewer_token=f"viewer-{i}",
                    viewer_expires_at=now + timedelta(hours=1),
                )
            )
        db.session.commit()
        db.session.execute(text(INSERT_SESSIONS), {"people": PEOPLE, "count": sessions})
        db.session.commit()
    with app.app_context(), db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE user_sessions"))
        conn.execute(text("VACUUM ANALYZE users"))


def captured_lookup(app, cookie: str) -> tuple[str, dict]:
    """Return the SQL statement and parameters sessions.load() sends for this cookie, as sent."""
    from sqlalchemy import event

    import sessions
    from models import db

    seen = []

    def note(conn, cursor, statement, parameters, context, executemany) -> None:
        seen.append((statement, parameters))

    with app.test_request_context("/api/session", headers={"Cookie": f"session={cookie}"}):
        reads = db.engines["reads"]  # the hook reads through an engine of its own
        event.listen(reads, "before_cursor_execute", note)
        try:
            assert sessions.load() is not None
        finally:
            event.remove(reads, "before_cursor_execute", note)
            db.session.remove()
    (lookup,) = [(statement, parameters) for statement, parameters in seen if "user_sessions" in statement]
    return lookup


def explain(app, cookies: list[str]) -> tuple[str, list[float]]:
    """EXPLAIN ANALYZE the hook's lookup for each cookie; return the first plan and every execution time (ms)."""
    from models import db

    plans = []
    for cookie in cookies:
        statement, parameters = captured_lookup(app, cookie)
        with app.app_context():
            rows = db.session.connection().exec_driver_sql(f"EXPLAIN (ANALYZE, BUFFERS) {statement}", parameters).scalars().all()
            db.session.rollback()
        plans.append("\n".join(rows))
    times = [float(re.search(r"Execution Time: ([\d.]+) ms", plan)[1]) for plan in plans]
    return plans[0], times


def time_lookups(app, cookies: list[str]) -> list[float]:
    """Resolve each signed cookie with sessions.load(), as the hook does; return microseconds each."""
    import sessions as app_sessions
    from models import db

    took = []
    for cookie in cookies:
        with app.test_request_context("/api/session", headers={"Cookie": f"session={cookie}"}):
            started = time.perf_counter()
            found = app_sessions.load()
            took.append((time.perf_counter() - started) * 1e6)
            assert found is not None
            db.session.remove()
    return took


def run(folder, quick: bool) -> dict:
    """Measure the lookup at each scale on a fresh PostgreSQL database."""
    from itsdangerous import Signer

    from models import db

    scales = (1_000, 100_000) if quick else (1_000, 1_000_000)
    lookups = 500 if quick else 5000
    results = []
    for sessions in scales:
        with postgres_database("bench_storage") as url:
            app = make_app(url, folder)
            started = time.monotonic()
            fill(app, sessions)
            filled = time.monotonic() - started
            signer = Signer(app.config["SECRET_KEY"], salt="session-id")
            cookies = [signer.sign(f"bench-session-{random.randint(1, sessions)}").decode() for _ in range(lookups)]
            time_lookups(app, cookies[:100])  # warm the pool and the statement cache
            took = time_lookups(app, cookies)
            plan, in_db_ms = explain(app, cookies[: min(200, lookups)])
            (folder / f"explain-{sessions}.txt").write_text(plan)
            with app.app_context():
                size = db.session.execute(text("SELECT pg_total_relation_size('user_sessions')")).scalar_one()
                db.session.remove()
                for engine in db.engines.values():
                    engine.dispose()
        results.append(
            {
                "sessions": sessions,
                "fill_seconds": filled,
                "table_mb": size / 2**20,
                "lookup_us_p50": median(took),
                "lookup_us_p99": percentile(took, 99),
                "in_database_us_p50": median(in_db_ms) * 1000,
                "in_database_us_p99": percentile(in_db_ms, 99) * 1000,
                "plan": plan,
            }
        )
    small, large = results[0], results[-1]
    return {
        "scales": results,
        "lookup_ratio_large_to_small_p50": large["lookup_us_p50"] / small["lookup_us_p50"],
        "in_database_ratio_large_to_small_p50": large["in_database_us_p50"] / small["in_database_us_p50"],
        "index_scan": all("Index Scan" in r["plan"] and "Seq Scan on user_sessions" not in r["plan"] for r in results),
    }
