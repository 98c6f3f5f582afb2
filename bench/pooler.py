"""Many instances on one PostgreSQL, directly and through PgBouncer in transaction mode.

4 gunicorn instances x 3 workers x 4 threads share one database and one strict stand-in provider
(its own instance, reached over HTTP). One person; at each expiry 48 requests at once, spread over
the instances, as a balancer would. Measured: the server connections PostgreSQL had open for the
app's database (sampled every 50 ms), refreshes per expiry, and requests that did not answer 200.
The same run directly and through PgBouncer (default_pool_size 10), on a PostgreSQL server of the
bench's own (max_connections 300, so that the direct run shows what it needs instead of failing).
"""

import threading
from pathlib import Path

import psycopg
from common import bench_env, cookie_header, fire, free_port, http_sign_in, median, percentile, start_server
from expiry import LEEWAY, TTL, wait_for_expiry

from standin.store import Store

INSTANCES, WORKERS, THREADS, BURST = 4, 3, 4, 48
POOL_SIZE = 10


class ConnectionCount:
    """Sample how many server connections the database has open, in a thread of its own."""

    def __init__(self, admin_url: str, database: str):
        self.admin_url, self.database = admin_url, database
        self.samples: list[int] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            while not self.done.wait(0.05):
                (count,) = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (self.database,)).fetchone()
                self.samples.append(count)

    def __enter__(self) -> "ConnectionCount":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()


def own_postgres():
    """A PostgreSQL server of the bench's own on a free port, with room for the direct run's connections."""
    from pgserver import PostgresServer

    server = PostgresServer().start()
    with psycopg.connect(server.url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET max_connections = 300")
    server.restart()
    return server


def run(folder: Path, quick: bool) -> list[dict]:
    """Run the bursts directly, then through PgBouncer, each on a fresh database of the same server."""
    from pgbouncer import PgBouncer

    server = own_postgres()
    try:
        results = []
        for through in ("postgresql", "pgbouncer"):
            database = f"bench_{through}"
            with psycopg.connect(server.url.replace("+psycopg", ""), autocommit=True) as conn:
                conn.execute(f"CREATE DATABASE {database}")
            direct = server.url.rsplit("/", 1)[0] + f"/{database}"
            pooler = PgBouncer(upstream=f"127.0.0.1:{server.port}", pool_size=POOL_SIZE).start() if through == "pgbouncer" else None
            try:
                url = pooler.url_for(direct) if pooler else direct
                results.append(bursts(folder / through, direct, url, server.url.replace("+psycopg", ""), database, quick) | {"through": through})
            finally:
                if pooler:
                    pooler.stop()
        return results
    finally:
        server.destroy()


def bursts(folder: Path, direct: str, url: str, admin_url: str, database: str, quick: bool) -> dict:
    expiries = 3 if quick else 6
    issuer_port, ports = free_port(), [free_port() for _ in range(INSTANCES)]
    callback = f"http://127.0.0.1:{ports[0]}/auth/callback"
    # Migrated directly, as a deployment's one-off job would; the instances then connect through `url`.
    env = bench_env(folder, direct, issuer_port, STANDIN_ACCESS_TOKEN_TTL=str(TTL), TOKEN_REFRESH_LEEWAY=str(LEEWAY), OAUTH_REDIRECT_URI=callback)
    app_env = env | {"DATABASE_URL": url, "OAUTH_PROVIDER": "autodesk", "OAUTH_CLIENT_ID": "standin-client", "OAUTH_CLIENT_SECRET": "standin-secret"}
    servers, provider = [], None
    try:
        provider = start_server(env | {"DATABASE_URL": direct}, issuer_port, folder / "provider.log", workers=1, threads=8)
        servers += [start_server(app_env, port, folder / f"app-{port}.log", workers=WORKERS, threads=THREADS) for port in ports]
        store = Store(env["STANDIN_DATABASE_URL"])
        cookie = cookie_header(http_sign_in(servers[0].url))
        rounds = []
        with ConnectionCount(admin_url, database) as connections:
            fire([("127.0.0.1", servers[i % INSTANCES].port, "/api/profile", cookie) for i in range(BURST)], together=True)  # every thread connects once
            for _ in range(expiries):
                wait_for_expiry(servers[0].url, cookie)
                before = store.count("refresh")
                replies = fire([("127.0.0.1", servers[i % INSTANCES].port, "/api/profile", cookie) for i in range(BURST)], together=True)
                rounds.append({"replies": replies, "refreshes": store.count("refresh") - before})
        rejected = store.count("refresh_rejected")
    finally:
        for server in [*servers, provider]:
            if server is not None:
                server.stop()
    latency_ms = [took * 1000 for r in rounds for _, took in r["replies"]]
    return {
        "setup": f"{INSTANCES} instances x {WORKERS} workers x {THREADS} threads, {BURST} requests per expiry",
        "expiries": len(rounds),
        "server_connections_max": max(connections.samples, default=0),
        "server_connections_median": median(connections.samples),
        "refreshes_per_expiry": [r["refreshes"] for r in rounds],
        "refresh_rejected_at_provider": rejected,
        "requests": len(latency_ms),
        "failed_requests": sum(1 for r in rounds for status, _ in r["replies"] if status != 200),
        "client_latency_ms_p50": median(latency_ms),
        "client_latency_ms_p99": percentile(latency_ms, 99),
    }
