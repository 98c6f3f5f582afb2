"""Run the benchmarks and print the README's Performance tables.

    .venv/bin/python bench/run.py            # the full run (about 35 minutes on 2 cores, 20 of them bench/ahead.py)
    .venv/bin/python bench/run.py --quick    # short runs, for trying changes
    .venv/bin/python bench/run.py --only hook,profile
    .venv/bin/python bench/run.py --patch bench/patches/waiters-wait-side-by-side.diff --only expiry
    .venv/bin/python bench/run.py --only soak       # the fault soak (bench/soak.py), not part of the default run
    .venv/bin/python bench/run.py --only peers,peers-refresh   # ours beside the peers of bench/peers/
    .venv/bin/python bench/run.py --only pooler     # 4 instances directly and through PgBouncer (bench/pooler.py)
    .venv/bin/python bench/run.py --only ahead      # latency at each expiry, refreshing ahead or in line (bench/ahead.py)

Needs PostgreSQL at postgresql://postgres@127.0.0.1:5432/postgres (BENCH_POSTGRES_ADMIN) to create
and drop its own databases, wrk (Debian package) and pyinstrument (requirements-dev.txt). Raw
results, server logs and profiles go to bench/results/ (not committed).
"""

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, ROOT, machine, median, patched_tree, postgres_database, wait_for_load, workdir

ALL = ("hook", "profile", "expiry", "pooler", "people", "people-slow", "storage", "peers", "peers-refresh", "ahead")
# Run only when asked for by --only: the soak takes 6 minutes (quick: 1.5) and starts its own PostgreSQL as root.
EXTRA = ("soak",)
# The stand-in's answer to a refresh is delayed this long in "people-slow", like a provider across a network.
PROVIDER_DELAY = 0.1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs and fewer people, for development")
    parser.add_argument("--only", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL + EXTRA)}")
    parser.add_argument("--patch", action="append", default=[], help="run on a copy of the app with this diff applied (repeatable)")
    parser.add_argument("--compare", action="append", default=[], help="hook only: serve this patched copy beside the working tree, rounds interleaved")
    parser.add_argument("--max-load", type=float, default=None, help="wait (up to 15 minutes) for the 1-minute load average to drop below this first")
    args = parser.parse_args()
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(chosen) - set(ALL + EXTRA)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    if args.patch:
        sys.exit(run_patched(args.patch, [a for a in sys.argv[1:] if a not in args.patch and a != "--patch" and not a.startswith("--patch=")]))
    if args.max_load is not None:
        print(f"load {wait_for_load(args.max_load, time.time() + 900):.2f}", file=sys.stderr)

    folder = workdir(("quick" if args.quick else "full") + os.environ.get("BENCH_LABEL", ""))
    results: dict = {"quick": args.quick, "label": os.environ.get("BENCH_LABEL", ""), "machine": machine()}
    results["started"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    results["command"] = shlex.join([".venv/bin/python", "bench/run.py", *sys.argv[1:]])
    results["commit"] = git_commit()
    for name in chosen:
        print(f"== {name}", file=sys.stderr)
        started = time.monotonic()
        results[name] = run_one(name, folder, args.quick, args.compare)
        results[f"{name}_seconds"] = round(time.monotonic() - started, 1)
        results[f"{name}_load_after"] = os.getloadavg()[0]
        (folder / "results.json").write_text(json.dumps(results, indent=2, default=str))
    report = markdown(results)
    (folder / "summary.md").write_text(report)
    print(report)
    print(f"raw results: {folder}", file=sys.stderr)


def run_patched(patches: list[str], argv: list[str]) -> int:
    """Copy the working tree, apply the patches to the copy, and run these benchmarks there."""
    with patched_tree(patches) as copy:
        label = "-" + "+".join(Path(p).stem for p in patches)
        env = os.environ | {"BENCH_RESULTS": str(RESULTS), "BENCH_LABEL": label}
        return subprocess.run([sys.executable, str(copy / "bench" / "run.py"), *argv], env=env).returncode


def git_commit() -> str:
    """Name the code measured: the commit, marked when tracked files differ from it."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + (" (modified)" if git("status", "--porcelain", "--untracked-files=no") else "")


def run_one(name: str, folder, quick: bool, compare: list[str]):
    if name == "hook":
        import hook

        if compare:
            with patched_tree(compare) as copy:
                label = "+".join(Path(p).stem for p in compare)
                return [hook.run(kind, folder, quick, trees={"working tree": None, label: copy}) for kind in ("sqlite", "postgresql")]
        return [hook.run(kind, folder, quick) for kind in ("sqlite", "postgresql")]
    if name == "profile":
        import profile_session

        return [profile_session.run(kind, folder, quick) for kind in ("sqlite", "postgresql")]
    if name == "expiry":
        import expiry

        with postgres_database("bench_expiry") as url:
            return expiry.run(folder, url, quick)
    if name == "pooler":
        import pooler

        return pooler.run(folder / "pooler", quick)
    if name == "peers":
        import peers_compare

        return [peers_compare.hook(kind, folder, quick) for kind in ("sqlite", "postgresql")]
    if name == "peers-refresh":
        import peers_compare

        return peers_compare.refresh(folder, quick)
    if name == "people":
        import people

        return [people.run(kind, folder, quick) for kind in ("postgresql", "sqlite")]
    if name == "people-slow":
        import people

        return [people.run(kind, folder, quick, provider_delay=PROVIDER_DELAY) for kind in ("postgresql", "sqlite")]
    if name == "ahead":
        import ahead

        return [ahead.run(kind, folder, quick) for kind in ("sqlite", "postgresql")]
    if name == "soak":
        import soak

        return soak.run(folder / "soak", quick, command="bench/run.py --only soak" + (" --quick" if quick else ""))
    import storage

    return storage.run(folder, quick)


def fmt(value: float, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def people_table(results: list[dict]) -> list[str]:
    first = results[0]
    delay = f"the provider answers each refresh after {first['provider_delay_ms']:.0f} ms" if first["provider_delay_ms"] else "in-process provider"
    out = [
        f"**3. Many people** ({first['people']} people, one request each, every access token stale; {delay}; 4 threads per worker)",
        "",
        "| Database | workers | requests/s | scaling | provider refreshes | failed | latency p50 / p99 | lock wait p50 / p99 / max |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in results:
        base = p["runs"][0]["requests_per_second"]
        for run in p["runs"]:
            out.append(
                f"| {p['database']} | {run['workers']} | {fmt(run['requests_per_second'])} | {run['requests_per_second'] / base:.2f}x | "
                f"{run['provider_refreshes']} of {run['requests']} | {run['failed_requests']} | "
                f"{fmt(run['latency_ms_p50'])} / {fmt(run['latency_ms_p99'])} ms | "
                f"{fmt(run['lock_wait_ms_p50'])} / {fmt(run['lock_wait_ms_p99'])} / {fmt(run['lock_wait_ms_max'])} ms |"
            )
    return [*out, ""]


PEER_NAMES = {
    "/healthz": "bare `/healthz` (our server)",
    "ours": "ours, `/api/session`",
    "P1": "P1 Flask-Login `user_loader` + `db.session.get` (signed cookie)",
    "P2": "P2 Flask-Login `request_loader` + session row",
}
PEER_SHORT_NAMES = {"ours": "ours", "P1": "P1 (`user_loader`, signed cookie)", "P2": "P2 (`request_loader`, session row)"}
# The targets: ours against the faster peer, and against bare /healthz per database.
PEER_TARGET = 1.5
HEALTHZ_TARGET = {"sqlite": 0.45, "postgresql": 0.35}
DATABASE_NAMES = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}


def met(ok: bool) -> str:
    return "met" if ok else "missed"


def peers_table(results: list[dict]) -> list[str]:
    """Ours beside the peers: median requests/s and ratios to bare /healthz, one column per database."""
    out = [
        f"**Ours beside two peers** (bench/peers/; wrk {results[0]['wrk']}; median requests/s, ÷ bare /healthz in brackets)",
        "",
        "| server | " + " | ".join(f"{DATABASE_NAMES[h['database']]} req/s (÷ /healthz)" for h in results) + " |",
        "|---|" + "---:|" * len(results),
    ]
    for name, label in PEER_NAMES.items():
        cells = []
        for h in results:
            rps, healthz = h["rps_median"][name], h["rps_median"]["/healthz"]
            cells.append(fmt(rps) if name == "/healthz" else f"{fmt(rps)} ({rps / healthz:.2f})")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    versus_peer, versus_healthz = [], []
    for h in results:
        rps = h["rps_median"]
        faster = max(("P1", "P2"), key=lambda name: rps[name])
        ratio = rps["ours"] / rps[faster]
        versus_peer.append(f"**{ratio:.2f}** ({faster}; >= {PEER_TARGET}: {met(ratio >= PEER_TARGET)})")
        target = HEALTHZ_TARGET[h["database"]]
        ratio = rps["ours"] / rps["/healthz"]
        versus_healthz.append(f"**{ratio:.2f}** (>= {target}: {met(ratio >= target)})")
    out.append("| ours ÷ the faster peer | " + " | ".join(versus_peer) + " |")
    out.append("| ours ÷ bare /healthz | " + " | ".join(versus_healthz) + " |")
    # The same ratios taken within each round (servers measured next to each other), then the median:
    # steadier than the ratio of medians when other work on the machine comes and goes.
    paired = []
    for h in results:
        rounds = h["rps"]
        within = range(len(rounds["ours"]))
        peer = median([rounds["ours"][i] / max(rounds["P1"][i], rounds["P2"][i]) for i in within])
        healthz = median([rounds["ours"][i] / rounds["/healthz"][i] for i in within])
        paired.append(f"{peer:.2f} / {healthz:.2f}")
    out.append("| the same, median of per-round ratios (÷ faster peer / ÷ /healthz) | " + " | ".join(paired) + " |")
    out.append("| failed requests, all servers | " + " | ".join(str(sum(h["failed_requests"].values())) for h in results) + " |")
    return [*out, ""]


def peers_refresh_table(results: list[dict]) -> list[str]:
    """Ours beside the peers when 50 requests arrive at the instant the access token goes stale."""
    first = results[0]
    out = [
        f"**Refresh under a burst at expiry, ours beside the peers** ({first['setup']}; {first['expiries']} expiries, each after a fresh sign-in)",
        "",
        "| server | refreshes at the provider, per expiry | failed requests, per expiry | replays rejected, per expiry "
        "| grant revoked by replay detection | client latency p50 / p99 |",
        "|---|---|---|---|---:|---:|",
    ]
    for x in results:
        failed = sum(x["failed_per_expiry"])
        statuses = f", answered {' or '.join(x['failed_statuses'])}" if failed else ""
        out.append(
            f"| {PEER_SHORT_NAMES[x['server']]} | {', '.join(map(str, x['refreshes_per_expiry']))} | "
            f"{', '.join(map(str, x['failed_per_expiry']))} ({failed} of {x['requests']}{statuses}) | "
            f"{', '.join(map(str, x['rejected_per_expiry']))} | {x['grant_revoked']} of {x['expiries']} | "
            f"{fmt(x['client_latency_ms_p50'])} / {fmt(x['client_latency_ms_p99'])} ms |"
        )
    return [*out, ""]


def pooler_table(runs: list[dict]) -> list[str]:
    """The many-instances run directly beside the same run through PgBouncer."""
    out = [
        f"**Connection pooler** ({runs[0]['setup']}, {runs[0]['expiries']} expiries; PgBouncer 1.18, transaction mode, default_pool_size 10)",
        "",
        "| PostgreSQL reached | server connections, max (median) | refreshes per expiry | failed requests | rejected at the provider | latency p50 / p99 |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for x in runs:
        out.append(
            f"| {'through PgBouncer' if x['through'] == 'pgbouncer' else 'directly'} | {x['server_connections_max']} ({fmt(x['server_connections_median'])}) | "
            f"{', '.join(map(str, x['refreshes_per_expiry']))} | {x['failed_requests']} of {x['requests']} | {x['refresh_rejected_at_provider']} | "
            f"{fmt(x['client_latency_ms_p50'])} / {fmt(x['client_latency_ms_p99'])} ms |"
        )
    return [*out, ""]


def markdown(r: dict) -> str:
    """Render the results as the README's tables."""
    m = r["machine"]
    out = [
        f"Machine: {m['cpus']} vCPUs ({m['cpu_model']}), {m['ram_gib']} GiB RAM, Python {m['python']}, "
        f"PostgreSQL {m['postgresql']}; 1-minute load {m['load_1min_at_start']:.2f} at start"
        + (" (quick run)" if r["quick"] else "")
        + (f"; patched: {r['label'][1:]}" if r.get("label") else ""),
        "",
    ]
    if r.get("command"):
        out += [f"Made by `{r['command']}` at commit {r['commit']}, {r['started']}.", ""]
    if "hook" in r:
        out += [
            "**1. Hook overhead** (one gunicorn, 2 workers x 4 threads; wrk " + r["hook"][0]["wrk"] + "; median requests/s)",
            "",
            "| Database | code | /healthz median (best) | /api/session median (best) | ratio of medians (of bests) | target | failed |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for h in r["hook"]:
            for v in h["variants"]:
                met = "met" if v["ratio"] >= 0.85 else "missed"
                # Best of the rounds: the round least disturbed by other work on a shared machine.
                best_h, best_s = max(v["healthz_rps"]), max(v["session_rps"])
                out.append(
                    f"| {h['database']} | {v['tree']} | {fmt(v['healthz_rps_median'])} ({fmt(best_h)}) | "
                    f"{fmt(v['session_rps_median'])} ({fmt(best_s)}) | **{v['ratio']:.2f}** ({best_s / best_h:.2f}) | "
                    f">= 0.85 ({met}) | {v['failed_requests']} |"
                )
        out.append("")
    if "profile" in r:
        out += [
            "**Where /api/session's time goes** (in-process, Flask test client; µs per request)",
            "",
            "| Database | /healthz | /api/session | ratio | SQL per request | whole hook | session lookup | cookie check | Fernet decrypt x1 |",
            "|---|---:|---:|---:|---|---:|---:|---:|---:|",
        ]
        for p in r["profile"]:
            pieces = p["hook_pieces_us"]
            sql = ", ".join(f"{n:g} {word}" for word, n in p["sql_statements_per_request"].items())
            out.append(
                f"| {p['database']} | {fmt(p['healthz_us'])} | {fmt(p['session_us'])} | {p['in_process_ratio']:.2f} | {sql} | "
                f"{fmt(pieces['load_person (whole hook)'])} | {fmt(pieces['sessions.load() alone'])} | "
                f"{fmt(pieces['cookie unsign + sha256'], 1)} | {fmt(pieces['one Fernet decrypt'], 1)} |"
            )
        out.append("")
    if "expiry" in r:
        e = r["expiry"]
        per = e["refreshes_per_expiry"]
        out += [
            f"**2. Refreshes per expiry** ({e['setup']}, {e['expiries']} expiries)",
            "",
            "| Measure | Result | Target |",
            "|---|---:|---:|",
            f"| refreshes at the provider per expiry | {', '.join(map(str, per))} | exactly 1 ({'met' if set(per) == {1} else 'missed'}) |",
            f"| failed requests | {e['failed_requests']} of {e['requests']} | 0 |",
            f"| refresh tokens rejected by the provider | {e['refresh_rejected_at_provider']} | 0 |",
            f"| requests that waited on the lock, per expiry | {', '.join(map(str, e['waiters_per_expiry']))} | |",
            f"| refresher's own refresh, p50 / max | {fmt(e['refresher_duration_ms_p50'])} / {fmt(e['refresher_duration_ms_max'])} ms | |",
            f"| of which its own work besides the provider call, p50 | {fmt(e['refresher_own_ms_p50'])} ms | |",
            f"| the same for a lone request (no burst), p50 / p90 of {len(e['refresher_own_alone_ms'])} | {fmt(e['refresher_own_alone_ms_p50'], 1)} / "
            f"{fmt(e['refresher_own_alone_ms_p90'], 1)} ms | < 5 ms ({'met' if e['refresher_own_alone_ms_p50'] < 5 else 'missed'}) |",
            f"| waiters done after the refresher, p50 / p99 | {fmt(e['waiter_done_after_refresher_ms_p50'])} / "
            f"{fmt(e['waiter_done_after_refresher_ms_p99'])} ms | < 20 / < 100 ms "
            f"({'met' if e['waiter_done_after_refresher_ms_p50'] < 20 and e['waiter_done_after_refresher_ms_p99'] < 100 else 'missed'}) |",
            f"| waiters' time in the refresh code, p50 / p99 | {fmt(e['waiter_duration_ms_p50'])} / {fmt(e['waiter_duration_ms_p99'])} ms | |",
            f"| of which waiting for the lock, p50 / p99 | {fmt(e['waiter_lock_wait_ms_p50'])} / {fmt(e['waiter_lock_wait_ms_p99'])} ms | |",
            f"| client latency of all requests, p50 / p99 | {fmt(e['client_latency_ms_p50'])} / {fmt(e['client_latency_ms_p99'])} ms | |",
            "",
        ]
    if "pooler" in r:
        out += pooler_table(r["pooler"])
    if "peers" in r:
        out += peers_table(r["peers"])
    if "peers-refresh" in r:
        out += peers_refresh_table(r["peers-refresh"])
    for key in ("people", "people-slow"):
        if key in r:
            out += people_table(r[key])
    if "storage" in r:
        s = r["storage"]
        out += [
            "**4. Scale of storage** (PostgreSQL; the hook's session lookup, sessions.load(), for random sessions)",
            "",
            "| Sessions | table + indexes | plan | lookup in the app p50 / p99 | in the database p50 / p99 |",
            "|---:|---:|---|---:|---:|",
        ]
        for x in s["scales"]:
            plan = "Index Scan using user_sessions_pkey" if "Index Scan using user_sessions_pkey" in x["plan"] else "see explain file"
            out.append(
                f"| {x['sessions']:,} | {fmt(x['table_mb'], 1)} MB | {plan} | {fmt(x['lookup_us_p50'])} / {fmt(x['lookup_us_p99'])} µs | "
                f"{fmt(x['in_database_us_p50'])} / {fmt(x['in_database_us_p99'])} µs |"
            )
        out += [
            "",
            f"Largest / smallest: {s['lookup_ratio_large_to_small_p50']:.2f}x in the app, {s['in_database_ratio_large_to_small_p50']:.2f}x in the database.",
            "",
        ]
    if "ahead" in r:
        import ahead

        out += ahead.table(r["ahead"])
    if "soak" in r:
        import soak

        out.append(soak.markdown(r["soak"]))
    return "\n".join(out)


if __name__ == "__main__":
    main()
