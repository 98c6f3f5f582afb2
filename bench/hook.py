"""Hook overhead: requests/second of /api/session (signed in, no provider call) against bare /healthz.

Both endpoints are served by the same gunicorn server in the same run and measured with the same
wrk settings, alternating healthz, session, healthz, session... so that drift in the machine's
load hits both alike; the median of the rounds is reported.
"""

import re
import subprocess

import requests
from common import bench_env, cookie_header, database, free_port, http_sign_in, median, start_server

WRK = "/usr/bin/wrk"


def wrk(url: str, seconds: int, connections: int, cookie: str | None = None, headers: tuple[str, ...] = ()) -> dict:
    """Run wrk against url and return requests/second, latency and the count of non-2xx answers."""
    args = [WRK, "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    if cookie:
        args[1:1] = ["-H", f"Cookie: {cookie}", "-H", "Accept: application/json"]
    for header in headers:
        args[1:1] = ["-H", header]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "rps": rps,
        "non_2xx": int(bad[1]) if bad else 0,
        "socket_errors": sum(int(n) for n in errors.groups()) if errors else 0,
        "p50": re.search(r"50%\s+(\S+)", out)[1],
        "p99": re.search(r"99%\s+(\S+)", out)[1],
    }


def run(kind: str, folder, quick: bool, workers: int = 2, threads: int = 4, trees: dict | None = None) -> dict:
    """Measure both endpoints on one server backed by a fresh database of this kind.

    trees: name -> code tree (None: the working tree); each gets its own server on the same
    database, and the rounds go healthz, session for each tree in turn, so they share the noise.
    """
    trees = trees or {"working tree": None}
    seconds, rounds = (3, 2) if quick else (10, 5)
    connections = workers * threads
    servers = {}
    with database(kind, folder, "bench_hook") as url:
        try:
            for n, (name, tree) in enumerate(trees.items()):
                # Each server is its own issuer (the stand-in inside it), which knows that server's callback.
                port = free_port()
                env = bench_env(folder / kind / str(n), url, port)
                servers[name] = start_server(env, port, folder / f"hook-{kind}-{n}.log", workers=workers, threads=threads, tree=tree)
            cookies = {}
            for n, (name, server) in enumerate(servers.items()):
                cookies[name] = cookie_header(http_sign_in(server.url, name=f"Hook Person {n}"))
                # The cookie must really sign in: a 401 would be fast and meaningless.
                check = requests.get(f"{server.url}/api/session", headers={"Cookie": cookies[name]}, timeout=30)
                assert check.status_code == 200 and check.json()["signed_in"], check.text
                wrk(f"{server.url}/healthz", 1, connections)  # warm up every worker
                wrk(f"{server.url}/api/session", 1, connections, cookies[name])
            measured = {name: ([], []) for name in servers}
            for _ in range(rounds):
                for name, server in servers.items():
                    measured[name][0].append(wrk(f"{server.url}/healthz", seconds, connections))
                    measured[name][1].append(wrk(f"{server.url}/api/session", seconds, connections, cookies[name]))
        finally:
            for server in servers.values():
                server.stop()
    variants = []
    for name, (healthz, session) in measured.items():
        h, s = median([r["rps"] for r in healthz]), median([r["rps"] for r in session])
        variants.append(
            {
                "tree": name,
                "healthz_rps": [r["rps"] for r in healthz],
                "session_rps": [r["rps"] for r in session],
                "healthz_rps_median": h,
                "session_rps_median": s,
                "ratio": s / h,
                "healthz_latency": [(r["p50"], r["p99"]) for r in healthz],
                "session_latency": [(r["p50"], r["p99"]) for r in session],
                "failed_requests": sum(r["non_2xx"] + r["socket_errors"] for r in healthz + session),
            }
        )
    return {
        "database": kind,
        "workers": workers,
        "threads": threads,
        "wrk": f"-t1 -c{connections} -d{seconds}s, {rounds} rounds interleaved",
        "variants": variants,
    }
