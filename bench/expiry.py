"""Refreshes per expiry: one person, 50 requests at once at the moment their access token goes stale.

Two gunicorn instances (3 workers x 4 threads each) share one PostgreSQL database and one strict
stand-in provider, served by a third instance. Access tokens live 65 s and count as stale 60 s
early, so a new expiry comes every 5 seconds; each burst is sent the instant the token enters the
leeway.
"""

import time
from datetime import UTC, datetime

import requests
from common import bench_env, cookie_header, fire, free_port, http_sign_in, median, percentile, refresh_log, start_server
from sqlalchemy import create_engine, text

from standin.store import Store

TTL, LEEWAY = 65, 60
LONE = 40


def wait_for_expiry(url: str, cookie: str) -> None:
    """Sleep until the person's access token enters the leeway: the next request must refresh."""
    reply = requests.get(f"{url}/api/session", headers={"Cookie": cookie}, timeout=30).json()
    expires = datetime.fromisoformat(reply["access_token_expires_at"]).timestamp()
    time.sleep(max(0.0, expires - LEEWAY - time.time()) + 0.05)


def run(folder, database_url: str, quick: bool, burst: int = 50, workers: int = 3, threads: int = 4) -> dict:
    """Send burst concurrent requests at each of 10 (quick: 3) expiries and count refreshes and failures."""
    expiries = 3 if quick else 10
    issuer_port, ports = free_port(), (free_port(), free_port())
    # People sign in through the first instance: the stand-in, on an origin of its own, registers its callback.
    callback = f"http://127.0.0.1:{ports[0]}/auth/callback"
    env = bench_env(
        folder / "expiry", database_url, issuer_port, STANDIN_ACCESS_TOKEN_TTL=str(TTL), TOKEN_REFRESH_LEEWAY=str(LEEWAY), OAUTH_REDIRECT_URI=callback
    )
    # The app instances reach the stand-in over HTTP, as they would APS: with OAUTH_PROVIDER=standin they
    # would embed one and call it in-process, sharing their interpreter lock with the refresh it answers.
    app_env = {**env, "OAUTH_PROVIDER": "autodesk", "OAUTH_CLIENT_ID": "standin-client", "OAUTH_CLIENT_SECRET": "standin-secret"}
    logs = [folder / "expiry-a.log", folder / "expiry-b.log"]
    servers, provider = [], None
    try:
        provider = start_server(env, issuer_port, folder / "expiry-provider.log", workers=1, threads=8)
        servers += [start_server(app_env, port, log, workers=workers, threads=threads) for port, log in zip(ports, logs, strict=True)]
        store = Store(env["STANDIN_DATABASE_URL"])
        cookie = cookie_header(http_sign_in(servers[0].url))
        # One burst before the first expiry, so every worker has opened its database connections: the
        # rounds measure the refresh, not a cold pool (a worker opens them once in its life).
        fire([("127.0.0.1", servers[i % 2].port, "/api/profile", cookie) for i in range(burst)], together=True)
        rounds = []
        for _ in range(expiries):
            wait_for_expiry(servers[0].url, cookie)
            before = store.count("refresh")
            started = time.time()
            # Alternate between the two instances, as a balancer would.
            # /api/session never refreshes (a front end may poll it); /api/profile uses the token, so it does.
            targets = [("127.0.0.1", servers[i % 2].port, "/api/profile", cookie) for i in range(burst)]
            replies = fire(targets, together=True)
            time.sleep(0.3)  # let the servers write their log lines
            events = refresh_log(logs, since=started - 0.001)
            rounds.append({"replies": replies, "refreshes": store.count("refresh") - before, "events": events})
        # The refresher's own work with the machine to itself: LONE requests one at a time, each sent once
        # the token has been made due in the database. The first refresh in each worker also builds its
        # SQL once (SQLAlchemy's compiled cache), so the median is the steady state.
        app_database = create_engine(database_url)
        alone = []
        for _ in range(LONE):
            with app_database.begin() as conn:
                conn.execute(text("UPDATE users SET access_expires_at = :due"), {"due": datetime(2000, 1, 1, tzinfo=UTC)})
            started = time.time()
            fire([("127.0.0.1", servers[0].port, "/api/profile", cookie)], together=True)
            time.sleep(0.2)
            alone += [own_work(e) for e in refresh_log(logs, since=started - 0.001) if e["outcome"] == "refreshed"]
        app_database.dispose()
        rejected = store.count("refresh_rejected")
    finally:
        for server in [*servers, provider]:
            if server is not None:
                server.stop()
    return summarize(rounds, rejected, burst, workers, threads, alone)


def own_work(event: dict) -> float:
    """Return a refresh's time besides the provider's round trip, from its log line (milliseconds to a tenth)."""
    return round(event["duration_ms"] - event["provider_ms"], 1)


def summarize(rounds: list[dict], rejected: int, burst: int, workers: int, threads: int, alone: list[float]) -> dict:
    """Turn the raw rounds into the figures the README reports."""
    failed = sum(1 for r in rounds for status, _ in r["replies"] if status != 200)
    latency_ms = [took * 1000 for r in rounds for _, took in r["replies"]]
    refresher_ms, own_ms, waited_lock_ms, behind_ms, waiter_ms, waiters = [], [], [], [], [], []
    for r in rounds:
        refreshed = [e for e in r["events"] if e["outcome"] == "refreshed" and e["kind"] == "access"]
        fresh = [e for e in r["events"] if e["outcome"] == "used_fresh"]
        waiters.append(len(fresh))
        if len(refreshed) == 1:
            holder = refreshed[0]
            refresher_ms.append(holder["duration_ms"])
            own_ms.append(own_work(holder))
            waited_lock_ms += [e["lock_wait_ms"] for e in fresh]
            waiter_ms += [e["duration_ms"] for e in fresh]
            # How much later than the refresher each waiter was done with the token (log stamps, ms).
            behind_ms += [(e["logged_at"] - holder["logged_at"]) * 1000 for e in fresh]
    return {
        "setup": f"2 instances x {workers} workers x {threads} threads, PostgreSQL, {burst} requests per expiry",
        "expiries": len(rounds),
        "refreshes_per_expiry": [r["refreshes"] for r in rounds],
        "refresh_rejected_at_provider": rejected,
        "requests": len(latency_ms),
        "failed_requests": failed,
        "waiters_per_expiry": waiters,
        "refresher_duration_ms_p50": median(refresher_ms),
        "refresher_duration_ms_max": max(refresher_ms, default=float("nan")),
        # Its duration less the provider's round trip: under the burst, and with the machine to itself.
        "refresher_own_ms_p50": median(own_ms),
        "refresher_own_alone_ms": alone,
        "refresher_own_alone_ms_p50": median(alone),
        "refresher_own_alone_ms_p90": percentile(alone, 90),
        "waiter_duration_ms_p50": median(waiter_ms),
        "waiter_duration_ms_p99": percentile(waiter_ms, 99),
        "waiter_lock_wait_ms_p50": median(waited_lock_ms),
        "waiter_lock_wait_ms_p99": percentile(waited_lock_ms, 99),
        "waiter_done_after_refresher_ms_p50": median(behind_ms),
        "waiter_done_after_refresher_ms_p99": percentile(behind_ms, 99),
        "client_latency_ms_p50": median(latency_ms),
        "client_latency_ms_p99": percentile(latency_ms, 99),
        "client_latency_ms_max": max(latency_ms),
    }
