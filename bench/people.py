"""Many people: each of 1,000 signed-in people sends one request while their access token is stale.

Every request must refresh (provider calls = people). Different people lock different rows on
PostgreSQL, so adding workers adds throughput; SQLite's write lock is database-wide, so there
different people's refreshes take turns. The stand-in provider keeps its own store in a separate
PostgreSQL database in both cases, so that its bookkeeping is not the shared bottleneck being measured.
"""

import time
from concurrent.futures import ThreadPoolExecutor

from common import (
    bench_env,
    cookie_header,
    database,
    fire,
    free_port,
    http_sign_in,
    median,
    percentile,
    postgres_database,
    refresh_log,
    start_server,
)
from hook import wrk
from itsdangerous import Signer

from standin.store import Store

# Tokens count as stale 5 s after they are issued: wait that long and every person needs a refresh.
TTL, LEEWAY = 65, 60
STALE_AFTER = TTL - LEEWAY


def sign_in_everyone(url: str, count: int, threads: int = 8) -> tuple[list[str], float]:
    """Sign count people in through the stand-in over real HTTP; return their cookies and the seconds it took."""
    started = time.monotonic()

    def one(i: int) -> str:
        return cookie_header(http_sign_in(url, name=f"Bench Person {i:05d}"))

    with ThreadPoolExecutor(threads) as pool:
        cookies = list(pool.map(one, range(count)))
    return cookies, time.monotonic() - started


def warm_up(url: str, secret: str, connections: int) -> None:
    """Start every worker's database connections with a signed cookie of an unknown session (401, one SELECT)."""
    cookie = Signer(secret, salt="session-id").sign("warm-up-not-a-session").decode()
    wrk(f"{url}/api/session", 2, connections, f"session={cookie}")


def run(kind: str, folder, quick: bool, worker_counts: tuple[int, ...] = (1, 3), threads: int = 4, provider_delay: float = 0.0) -> dict:
    """Sign people in, then for each worker count fire one request per person while all tokens are stale.

    provider_delay: seconds the stand-in waits before answering each refresh, like a provider across
    a network; the refresh holds its lock that long, which is when lock contention shows.
    """
    people = (50 if quick else 200) if provider_delay else (100 if quick else 1000)
    sub = folder / (f"people-{kind}" + ("-slow-provider" if provider_delay else ""))
    port = free_port()
    with database(kind, sub.parent, "bench_people") as url, postgres_database("bench_standin") as standin_url:
        env = bench_env(sub, url, port, STANDIN_ACCESS_TOKEN_TTL=str(TTL), TOKEN_REFRESH_LEEWAY=str(LEEWAY), STANDIN_DATABASE_URL=standin_url)
        store = Store(standin_url)
        server = start_server(env, port, sub / "signin.log", workers=3, threads=threads)
        try:
            cookies, signin_seconds = sign_in_everyone(server.url, people)
        finally:
            server.stop()
        last_issued = time.time()
        runs = []
        for workers in worker_counts:
            log = sub / f"burst-{workers}w.log"
            server = start_server(env, port, log, workers=workers, threads=threads)
            try:
                warm_up(server.url, env["SECRET_KEY"], workers * threads)
                # Every token was issued (or last refreshed) at least STALE_AFTER seconds ago.
                time.sleep(max(0.0, last_issued + STALE_AFTER + 0.5 - time.time()))
                if provider_delay:
                    store.inject("timeout", count=people, delay=provider_delay)
                before = store.count("refresh")
                started = time.monotonic()
                since = time.time()
                replies = fire([("127.0.0.1", port, "/api/profile", cookie) for cookie in cookies], together=False)
                wall = time.monotonic() - started
                last_issued = time.time()
                time.sleep(0.3)
                refreshes = store.count("refresh") - before
                store.clear_faults()
            finally:
                server.stop()
            events = [e for e in refresh_log([log], since=since - 0.001) if e["kind"] == "access"]
            latency_ms = [took * 1000 for _, took in replies]
            lock_ms = [e["lock_wait_ms"] for e in events if e["outcome"] == "refreshed"]
            runs.append(
                {
                    "workers": workers,
                    "threads": threads,
                    "requests": len(replies),
                    "failed_requests": sum(1 for status, _ in replies if status != 200),
                    "statuses": sorted({str(status) for status, _ in replies}),
                    "provider_refreshes": refreshes,
                    "refreshed_events": len(lock_ms),
                    "used_fresh_events": sum(1 for e in events if e["outcome"] == "used_fresh"),
                    "seconds": wall,
                    "requests_per_second": len(replies) / wall,
                    "latency_ms_p50": median(latency_ms),
                    "latency_ms_p99": percentile(latency_ms, 99),
                    "lock_wait_ms_p50": median(lock_ms),
                    "lock_wait_ms_p99": percentile(lock_ms, 99),
                    "lock_wait_ms_max": max(lock_ms, default=float("nan")),
                    "refresh_duration_ms_p50": median([e["duration_ms"] for e in events if e["outcome"] == "refreshed"]),
                }
            )
    first, last = runs[0], runs[-1]
    return {
        "database": kind,
        "people": people,
        "provider_delay_ms": provider_delay * 1000,
        "sign_in_seconds": signin_seconds,
        "runs": runs,
        "scaling": last["requests_per_second"] / first["requests_per_second"],
    }
