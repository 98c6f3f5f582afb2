"""No request waits for the provider: latency at each expiry, refreshing ahead of it or in line, beside the peers.

The stand-in answers every refresh after PROVIDER_DELAY_MS (STANDIN_REFRESH_DELAY_MS), like APS
across a network. Each server runs as 2 instances x 3 workers x 4 threads on a fresh database of
the kind measured, the stand-in embedded as in bench/peers_compare.py. Two scenarios, in turn:

- one person sending a request every 250 ms across 10 (quick: 3) expiries;
- 50 (quick: 20) people signed in one after another (so their expiries are staggered), each
  sending a request every 250 ms for 40 s (quick: 20 s), their tokens used for 30 s each (PEOPLE_TTL).

A request is "at an expiry" when it was in flight while the provider was answering a refresh of
its person (the stand-in's refresh record, less the delay), or within 250 ms of it; the others are
"between expiries". Refreshes of one person less than MIN_GAP apart count as one expiry's.
Servers: ours refreshing ahead (TOKEN_REFRESH_AHEAD), ours in line (TOKEN_REFRESH_AHEAD=0), and
the peers P1 and P2 (bench/peers/), which refresh in line.
"""

import asyncio
import time
from collections import defaultdict
from contextlib import ExitStack

from common import _one, database, free_port, median, percentile
from peers_compare import prepare, sign_in, start
from sqlalchemy import select

from standin.store import Store, digest, events

PROVIDER_DELAY_MS = 300
# Tokens live 66 s and count as expired 60 s early: an expiry about every 6 s, refreshed ahead 2 s before that.
TTL, LEEWAY, AHEAD = 66, 60, 2
# For many people, 30 s of use per token: 50 people then need 1.7 refreshes a second, which SQLite's one write
# lock, held across each 300 ms refresh, can serve (at 6 s, 8 a second would queue without end, ahead or in line).
PEOPLE_TTL = 90
INTERVAL = 0.25  # seconds between one person's requests
NEAR = 0.25  # a request this close to a provider's refresh counts as at the expiry
MIN_GAP = 1.0  # a person's refreshes closer than this are one expiry's (a second refresh of the same token)
# name -> (peers_compare server, extra environment, path that uses the access token)
SERVERS = {
    "ours, ahead": ("ours", {"TOKEN_REFRESH_AHEAD": str(AHEAD)}, "/api/profile"),
    "ours, in line": ("ours", {"TOKEN_REFRESH_AHEAD": "0"}, "/api/profile"),
    "P1": ("P1", {}, "/api/session"),
    "P2": ("P2", {}, "/api/session"),
}


def run(kind: str, folder, quick: bool) -> dict:
    """Measure every server on one kind of database."""
    return {"database": kind, "provider_delay_ms": PROVIDER_DELAY_MS, "servers": [run_server(label, kind, folder, quick) for label in SERVERS]}


def run_server(label: str, kind: str, folder, quick: bool) -> dict:
    """Run both scenarios against one server, each on instances of its own with its own token lifetime."""
    one = serve(label, kind, folder / "one", TTL, ["Ahead Person"], (3 if quick else 10) * (TTL - LEEWAY))
    people = [f"Ahead Person {i:03d}" for i in range(20 if quick else 50)]
    many = serve(label, kind, folder / "people", PEOPLE_TTL, people, 20 if quick else 40)
    return {"server": label, "one_person": one, "people": many}


def serve(label: str, kind: str, folder, ttl: int, people: list[str], seconds: float) -> dict:
    """Start 2 instances of a server on a fresh database, sign people in one after another (staggered expiries) and run a scenario."""
    name, extra, path = SERVERS[label]
    slug = f"ahead-{kind}-{label.replace(', ', '-').replace(' ', '-')}"
    with database(kind, folder.parent, f"bench_{slug.replace('-', '_')}") as url, ExitStack() as stack:
        issuer_port = free_port()
        env = prepare(
            name,
            folder / slug,
            url,
            issuer_port,
            STANDIN_ACCESS_TOKEN_TTL=str(ttl),
            TOKEN_REFRESH_LEEWAY=str(LEEWAY),
            STANDIN_REFRESH_DELAY_MS=str(PROVIDER_DELAY_MS),
            **extra,
        )
        servers = []
        for n, port in enumerate((issuer_port, free_port())):
            servers.append(start(name, env, port, folder / f"{slug}-{'ab'[n]}.log", workers=3, threads=4))
            stack.callback(servers[-1].stop)
        store = Store(env["STANDIN_DATABASE_URL"])
        stack.callback(store.engine.dispose)
        cookies = [sign_in(name, servers[0].url, person) for person in people]
        return scenario(store, [s.port for s in servers], path, cookies, people, seconds)


def scenario(store, ports: list[int], path: str, cookies: list[str], people: list[str], seconds: float) -> dict:
    """Send each person's requests every INTERVAL for seconds, alternating instances; summarize against the provider's refreshes."""
    started = time.time()
    sent = asyncio.run(_paced(ports, path, cookies, seconds))
    time.sleep(PROVIDER_DELAY_MS / 1000 + 0.5)  # a refresh started by the last requests reaches the provider
    subs = {digest(person.lower())[:24]: i for i, person in enumerate(people)}
    with store.engine.connect() as conn:
        rows = conn.execute(select(events.c.kind, events.c.sub, events.c.at).where(events.c.at >= started)).all()
    refreshes = defaultdict(list)
    for kind, sub, at in rows:
        if kind == "refresh" and sub in subs:
            refreshes[subs[sub]].append(at)
    return summarize(sent, refreshes, sum(1 for kind, _, _ in rows if kind == "refresh_rejected"))


async def _paced(ports: list[int], path: str, cookies: list[str], seconds: float) -> list[tuple[int, float, int | str, float]]:
    """Return (person, sent at, status, seconds) of every request; each person's first request is offset, so the load is even."""
    replies = []
    begin = time.time()

    async def person(i: int, cookie: str) -> None:
        tick = begin + INTERVAL * i / len(cookies)
        n = 0
        while tick < begin + seconds:
            await asyncio.sleep(max(0.0, tick - time.time()))
            at = time.time()
            status, took = await _one("127.0.0.1", ports[(n + i) % len(ports)], path, cookie, None, [])
            replies.append((i, at, status, took))
            n += 1
            tick += INTERVAL

    await asyncio.gather(*(person(i, cookie) for i, cookie in enumerate(cookies)))
    return replies


def summarize(sent: list[tuple[int, float, int | str, float]], refreshes: dict[int, list[float]], rejected: int) -> dict:
    """Split latencies into at an expiry and between expiries; count refreshes per expiry."""
    delay = PROVIDER_DELAY_MS / 1000
    at_expiry, between = [], []
    for person, at, _, took in sent:
        near = any(at <= done + NEAR and at + took >= done - delay - NEAR for done in refreshes.get(person, []))
        (at_expiry if near else between).append(took * 1000)
    per_expiry = []
    for times in refreshes.values():
        times.sort()
        group = 1
        for earlier, later in zip(times, times[1:], strict=False):
            if later - earlier < MIN_GAP:
                group += 1
            else:
                per_expiry.append(group)
                group = 1
        per_expiry.append(group)
    p99_between = percentile(between, 99)
    worst = max(at_expiry, default=float("nan"))
    return {
        "people": len({person for person, *_ in sent}),
        "requests": len(sent),
        "failed": sum(1 for *_, status, _ in sent if status != 200),
        "expiries": len(per_expiry),
        "refreshes_per_expiry_max": max(per_expiry, default=0),
        "expiries_with_more_than_one_refresh": sum(1 for n in per_expiry if n > 1),
        "refresh_rejected": rejected,
        "at_expiry_requests": len(at_expiry),
        "at_expiry_ms_p50": median(at_expiry),
        "at_expiry_ms_max": worst,
        "between_ms_p50": median(between),
        "between_ms_p99": p99_between,
        "at_expiry_max_over_between_p99": worst / p99_between if at_expiry and between else float("nan"),
        "all_ms_max": max((took * 1000 for *_, took in sent), default=float("nan")),
    }


def table(results: list[dict]) -> list[str]:
    """Render both databases' runs as one table, with the issue's targets."""
    delay = results[0]["provider_delay_ms"]
    out = [
        f"**No request waits for the provider** (2 instances x 3 workers x 4 threads; the provider answers each refresh after {delay} ms; "
        f"tokens count as expired every {TTL - LEEWAY} s (many people: {PEOPLE_TTL - LEEWAY} s), refreshed ahead {AHEAD} s before; "
        f"a request every {int(INTERVAL * 1000)} ms per person)",
        "",
        "| Database | server | scenario | requests (failed) | expiries | refreshes per expiry, max | at an expiry: requests, p50 / max | "
        "between: p50 / p99 | max at ÷ p99 between (<= 1.5) | max at < provider delay |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for s in r["servers"]:
            for key, scenario_name in (("one_person", "1 person"), ("people", f"{s['people']['people']} people")):
                x = s[key]
                ratio = x["at_expiry_max_over_between_p99"]
                out.append(
                    f"| {r['database']} | {s['server']} | {scenario_name} | {x['requests']:,} ({x['failed']}) | {x['expiries']} | "
                    f"{x['refreshes_per_expiry_max']} | {x['at_expiry_requests']}, {x['at_expiry_ms_p50']:.0f} / {x['at_expiry_ms_max']:.0f} ms | "
                    f"{x['between_ms_p50']:.0f} / {x['between_ms_p99']:.0f} ms | {ratio:.2f} ({'met' if ratio <= 1.5 else 'missed'}) | "
                    f"{'met' if x['at_expiry_ms_max'] < delay else 'missed'} |"
                )
    return [*out, ""]
