"""Ours beside two peers written the way Flask developers usually write them (bench/peers/).

hook: requests/second of bare /healthz (our server), our /api/session, and the peers' equivalent
endpoint, each signed in with a fresh token; one gunicorn per server (2 workers x 4 threads
gthread), each on a fresh database of its own of the same kind; wrk rounds interleaved (the
order turns every round), medians reported.

refresh: one person, 50 requests at once at the moment the access token goes stale, against
the strict stand-in; 2 instances x 3 workers x 4 threads on PostgreSQL, as bench/expiry.py does
for ours, run for ours and each peer in turn. Every expiry starts from a fresh sign-in, so a grant
that replay detection revoked at one expiry does not fail all the next ones too.
"""

import subprocess
import time
from contextlib import ExitStack
from datetime import datetime

import requests
from common import ROOT, bench_env, database, fire, free_port, http_sign_in, median, percentile, server_env, start_server
from hook import wrk
from sqlalchemy import func, select

from servers import BIN
from standin.store import Store, digest, refresh_tokens

# name -> (gunicorn target, Flask --app, session cookie); ours first.
SERVERS = {
    "ours": ("app:create_app()", None, "session"),
    "P1": ("bench.peers.p1_user_loader:create_app()", "bench.peers.p1_user_loader", "session"),
    "P2": ("bench.peers.p2_request_loader:create_app()", "bench.peers.p2_request_loader", "sid"),
}
# Flask-Login's session protection ties P1's cookie to the User-Agent that signed in: wrk sends the same one.
USER_AGENT = f"User-Agent: {requests.utils.default_user_agent()}"
TTL, LEEWAY = 65, 60


def prepare(name: str, folder, database_url: str, issuer_port: int, **extra: str) -> dict:
    """Return a server's environment with its schema in place: ours by its migrations, a peer by its init-db."""
    if name == "ours":
        return bench_env(folder, database_url, issuer_port, **extra)
    folder.mkdir(parents=True, exist_ok=True)
    env = server_env(folder, database_url, f"http://127.0.0.1:{issuer_port}/standin", **extra)
    subprocess.run([BIN / "flask", "--app", SERVERS[name][1], "init-db"], cwd=ROOT, env=env, check=True, capture_output=True)
    return env


def start(name: str, env: dict, port: int, log_path, workers: int, threads: int):
    return start_server(env, port, log_path, workers=workers, threads=threads, target=SERVERS[name][0])


def sign_in(name: str, url: str, person: str) -> str:
    """Sign a person in over HTTP and return the Cookie header that keeps them signed in."""
    browser = http_sign_in(url, name=person)
    cookie = SERVERS[name][2]
    return f"{cookie}={browser.cookies.get(cookie)}"


def session_reply(url: str, cookie: str) -> dict:
    reply = requests.get(f"{url}/api/session", headers={"Cookie": cookie, "Accept": "application/json"}, timeout=30)
    assert reply.status_code == 200 and reply.json()["signed_in"], reply.text
    return reply.json()


def hook(kind: str, folder, quick: bool, workers: int = 2, threads: int = 4) -> dict:
    """Measure /healthz and the three signed-in endpoints, rounds interleaved, on databases of this kind."""
    seconds, rounds = (3, 2) if quick else (10, 11)
    connections = workers * threads
    with ExitStack() as stack:
        servers, cookies = {}, {}
        for name in SERVERS:
            url = stack.enter_context(database(kind, folder, f"bench_peers_{name.lower()}"))
            port = free_port()
            env = prepare(name, folder / f"peers-{kind}-{name}", url, port)
            servers[name] = start(name, env, port, folder / f"peers-{kind}-{name}.log", workers, threads)
            stack.callback(servers[name].stop)
            cookies[name] = sign_in(name, servers[name].url, f"Peer Person {name}")
            session_reply(servers[name].url, cookies[name])  # a 401 would be fast and meaningless
        targets = {"/healthz": (f"{servers['ours'].url}/healthz", None)}
        targets |= {name: (f"{server.url}/api/session", cookies[name]) for name, server in servers.items()}
        for url, cookie in targets.values():
            wrk(url, 1, connections, cookie, (USER_AGENT,))  # warm up every worker
        measured = {name: [] for name in targets}
        order = list(targets)
        for n in range(rounds):
            for name in order[n % len(order) :] + order[: n % len(order)]:
                url, cookie = targets[name]
                measured[name].append(wrk(url, seconds, connections, cookie, (USER_AGENT,)))
    rps = {name: median([r["rps"] for r in runs]) for name, runs in measured.items()}
    return {
        "database": kind,
        "wrk": f"-t1 -c{connections} -d{seconds}s, {rounds} rounds interleaved; gunicorn {workers} workers x {threads} threads gthread",
        "rps_median": rps,
        "rps": {name: [r["rps"] for r in runs] for name, runs in measured.items()},
        "latency_p50_p99": {name: [(r["p50"], r["p99"]) for r in runs] for name, runs in measured.items()},
        "failed_requests": {name: sum(r["non_2xx"] + r["socket_errors"] for r in runs) for name, runs in measured.items()},
    }


def refresh(folder, quick: bool, burst: int = 50, workers: int = 3, threads: int = 4) -> list[dict]:
    """Run the burst at expiry against ours and each peer in turn, on PostgreSQL, with the strict stand-in."""
    return [refresh_one(name, folder, quick, burst, workers, threads) for name in SERVERS]


def refresh_one(name: str, folder, quick: bool, burst: int, workers: int, threads: int) -> dict:
    expiries = 2 if quick else 10
    person = f"Burst Person {name}"
    with database("postgresql", folder, f"bench_burst_{name.lower()}") as url, ExitStack() as stack:
        issuer_port = free_port()
        env = prepare(name, folder / f"burst-{name}", url, issuer_port, STANDIN_ACCESS_TOKEN_TTL=str(TTL), TOKEN_REFRESH_LEEWAY=str(LEEWAY))
        servers = []
        for n, port in enumerate((issuer_port, free_port())):
            servers.append(start(name, env, port, folder / f"burst-{name}-{'ab'[n]}.log", workers, threads))
            stack.callback(servers[-1].stop)
        store = Store(env["STANDIN_DATABASE_URL"])
        rounds = []
        for _ in range(expiries):
            cookie = sign_in(name, servers[0].url, person)
            expires = datetime.fromisoformat(session_reply(servers[0].url, cookie)["access_token_expires_at"]).timestamp()
            time.sleep(max(0.0, expires - LEEWAY - time.time()) + 0.05)
            before = store.count("refresh"), store.count("refresh_rejected")
            # Alternate between the two instances, as a balancer would.
            # Ours answers /api/session without refreshing (a front end may poll it); /api/profile uses the token.
            path = "/api/profile" if name == "ours" else "/api/session"
            replies = fire([("127.0.0.1", servers[i % 2].port, path, cookie) for i in range(burst)], together=True)
            time.sleep(0.3)  # let the last refreshes finish at the provider
            with store.engine.connect() as conn:
                active = select(func.count()).where(refresh_tokens.c.sub == digest(person.lower())[:24], refresh_tokens.c.status == "active")
                alive = conn.execute(active).scalar_one() > 0
            rounds.append(
                {
                    "statuses": [status for status, _ in replies],
                    "latency_ms": [took * 1000 for _, took in replies],
                    "refreshes": store.count("refresh") - before[0],
                    "rejected": store.count("refresh_rejected") - before[1],
                    "grant_alive": alive,
                }
            )
    latency = [ms for r in rounds for ms in r["latency_ms"]]
    return {
        "server": name,
        "setup": f"2 instances x {workers} workers x {threads} threads, PostgreSQL, strict stand-in, {burst} requests per expiry",
        "expiries": expiries,
        "requests": len(latency),
        "refreshes_per_expiry": [r["refreshes"] for r in rounds],
        "failed_per_expiry": [sum(1 for status in r["statuses"] if status != 200) for r in rounds],
        "failed_statuses": sorted({str(status) for r in rounds for status in r["statuses"] if status != 200}),
        "rejected_per_expiry": [r["rejected"] for r in rounds],
        "grant_revoked": sum(1 for r in rounds if not r["grant_alive"]),
        "client_latency_ms_p50": median(latency),
        "client_latency_ms_p99": percentile(latency, 99),
    }
