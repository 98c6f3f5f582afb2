"""Fault soak: people with real cookies browse two app instances while faults hit at random.

    .venv/bin/python bench/soak.py                  # 200 people for 5 minutes (about 6 minutes in all)
    .venv/bin/python bench/soak.py --quick          # 30 people for 60 seconds
    .venv/bin/python bench/run.py --only soak       # the same, as one of the benchmarks

Every simulated person browses with a requests.Session per device (its own cookies, the stand-in's
too), follows every redirect, through the stand-in's pages as well, and fills in the stand-in's
sign-in form whenever it is shown. Two gunicorn instances (2 workers x 4 threads each) share one
PostgreSQL server that the soak starts itself with Debian's initdb/pg_ctl, so that it may restart
it, and one strict stand-in whose store is a SQLite file (a real provider does not restart with our
database). Access tokens go stale every 15 seconds. While people browse, one fault at a time hits
at random: provider 5xx, provider timeouts (shorter and longer than PROVIDER_TIMEOUT), replies
dropped after the provider rotated, a gunicorn worker SIGKILLed while it waits on a refresh, a
PostgreSQL restart. People also sign in on a second device (timed to their token's expiry), race a
sign-out on one device against a sign-in on another, and sign out on purpose.

Every time a device finds itself signed out when it should not be, the soak notes whether the
person had to see the sign-in form ("lost") or came back to their page without one ("recovered
silently"), and afterwards names the cause: a lost rotation in the app's refresh events (the
provider rotated and the reply never arrived: "unavoidable"), a sign-out race, a sign-in on a
second device, or else the fault that was active since the person's token was last stored. A
deliberate sign-out is not a loss. Requests are also judged against the fault windows: the success
rate and the server errors (5xx) outside them should be 100% and 0.

Runs as root: initdb and pg_ctl run as the postgres user through runuser. Needs PostgreSQL's server
binaries (/usr/lib/postgresql/*/bin). Server logs and the raw records go to bench/results/.
"""

import argparse
import glob
import html
import json
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import requests
from common import bench_env, free_port, start_server, workdir
from sqlalchemy import func, select

from standin.store import Store, faults

# Access tokens live 75 s and count as stale 60 s early: every person refreshes every 15 s.
TTL, LEEWAY = 75, 60
# The app's default PROVIDER_TIMEOUT: provider timeouts are injected both shorter (a slow provider) and longer.
PROVIDER_TIMEOUT = 10
WORKERS, THREADS = 2, 4
PAGES = ("/session", "/devices", "/viewer")
# What a person does between scenarios, with weights: pages, and the API calls those pages make.
BROWSING = (("/session", 25), ("/api/lifecycle", 20), ("/api/session", 15), ("/api/profile", 10), ("/api/viewer-token", 15), ("/devices", 8), ("/viewer", 7))
THINK_SECONDS = (1.5, 6.5)
REQUEST_TIMEOUT = 40
MAX_HOPS = 12
FAULTS = ("provider 5xx", "provider timeout", "reply dropped after rotation", "worker killed mid-refresh", "PostgreSQL restart")
SCENARIOS = ("sign-in on a second device", "sign-out race", "deliberate sign-out")
CAUSES = (*FAULTS, "sign-in on a second device", "sign-out race", "no fault active")
AUTHORIZE_PATH = "/authentication/v2/authorize"
HIDDEN_INPUT = re.compile(r'<input type="hidden" name="([^"]+)" value="([^"]*)"')
CSRF_INPUT = re.compile(r'name="csrf_token" value="([^"]+)"')
TRY_AGAIN = re.compile(r'<a class="button primary" href="([^"]+)">Try again</a>')


# --- The PostgreSQL server the soak owns -------------------------------------------------------


class Postgres:
    """A PostgreSQL server of the soak's own, made with Debian's initdb/pg_ctl, so that it can be restarted."""

    def __init__(self):
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(re.search(r"/(\d+)/bin/", p)[1]))
        if not found:
            raise SystemExit("PostgreSQL's server binaries were not found under /usr/lib/postgresql/*/bin.")
        self.bin = Path(found[-1]).parent
        self.dir = Path(tempfile.mkdtemp(prefix="soak-pg-"))
        shutil.chown(self.dir, "postgres", "postgres")  # initdb and the server refuse to run as root
        self.data = self.dir / "data"
        self.port = free_port()
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *args) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *map(str, args)], check=True, capture_output=True, timeout=120)

    def _ctl(self, action: str) -> None:
        options = f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.dir}"
        mode = ["-m", "fast"] if action in ("restart", "stop") else []
        self._as_postgres(self.bin / "pg_ctl", "-D", self.data, "-l", self.dir / "server.log", "-o", options, *mode, "-w", "-t", "60", action)

    def start(self) -> "Postgres":
        self._as_postgres(self.bin / "initdb", "-D", self.data, "--auth=trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
        self._ctl("start")
        return self

    def restart(self) -> None:
        self._ctl("restart")
        self.restarts += 1

    def stop(self, keep_log: Path | None = None) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._as_postgres(self.bin / "pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        finally:
            if keep_log is not None and (self.dir / "server.log").exists():
                shutil.copy(self.dir / "server.log", keep_log)
            shutil.rmtree(self.dir, ignore_errors=True)


# --- What happened: requests, sign-outs, fault windows -----------------------------------------


@dataclass
class Hop:
    method: str
    url: str
    status: int | str  # an HTTP status, or the name of the connection error
    at: float


@dataclass
class Visit:
    """One navigation or API call with the redirects it followed (and the sign-in form it filled in)."""

    hops: list[Hop]
    final: requests.Response | None
    form: bool = False

    @property
    def status(self) -> int | str:
        return self.hops[-1].status if self.hops else "none"

    @property
    def path(self) -> str:
        return urlsplit(self.hops[-1].url).path if self.hops else ""

    @property
    def through_login(self) -> bool:
        return any(urlsplit(h.url).path == "/auth/login" for h in self.hops)

    @property
    def silent_tried(self) -> bool:
        return any(AUTHORIZE_PATH in h.url and "prompt=none" in h.url for h in self.hops)

    def landed(self, pages: tuple[str, ...]) -> bool:
        """Tell whether it ended on one of our pages, answered 200 (a signed-in page: they all require it)."""
        return self.status == 200 and self.path in pages


@dataclass
class Device:
    """One browser of a person: its own cookie jar, so its own session here and at the provider."""

    number: int
    http: requests.Session = field(default_factory=requests.Session)
    signed_in: bool = False
    csrf: str = ""


@dataclass
class SignOut:
    person: int
    device: int
    at: float  # the step that found it was sent
    seen: float  # the answer saying so had arrived (the next request was sent)
    form: bool
    recovered: bool
    trigger: str
    silent_tried: bool
    user_id: int | None = None
    cause: str = ""
    unavoidable: bool = False
    evidence: str = ""


class Record:
    """Everything the people and the fault thread saw, with the times it happened (thread-safe)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.steps: list[dict] = []
        self.signouts: list[SignOut] = []
        self.windows: list[dict] = []  # global fault windows
        self.scenarios: list[dict] = []
        self.deliberate = 0

    def step(self, person: int, kind: str, path: str, visits: list[Visit], ok: bool) -> None:
        hops = [h for v in visits for h in v.hops]
        if not hops:
            return
        entry = {"person": person, "kind": kind, "path": path, "start": hops[0].at, "end": time.time(), "ok": ok}
        entry["hops"] = [(h.method, urlsplit(h.url).path, h.status, round(h.at, 3)) for h in hops]
        with self.lock:
            self.steps.append(entry)

    def add(self, attribute: str, item) -> None:
        with self.lock:
            getattr(self, attribute).append(item)


# --- A simulated person ------------------------------------------------------------------------


class Person:
    def __init__(self, number: int, run_id: str, urls: list[str], record: Record, seed: int):
        self.number = number
        self.name = f"Soak {run_id} Person {number:04d}"
        self.urls = urls
        self.record = record
        self.rng = random.Random(seed)
        self.devices: list[Device] = []
        self.next_device = 0
        self.orders: queue.SimpleQueue = queue.SimpleQueue()
        self.user_id: int | None = None
        self.sign_ins: list[tuple[float, int]] = []  # (callback sent, device) of completed sign-ins
        self.failed_sign_ins: list[tuple[float, int, int | str]] = []
        self.race_logouts: list[float] = []
        self.windows: list[tuple[float, float, str]] = []  # this person's own scenarios

    # Browsing primitives

    def base(self) -> str:
        """Pick an instance for the next navigation, as a load balancer would."""
        return self.rng.choice(self.urls)

    def new_device(self) -> Device:
        self.next_device += 1
        device = Device(self.next_device)
        device.http.headers["User-Agent"] = f"soak-browser/1.0 (person {self.number}, device {device.number})"
        # A connection per request: a kept-alive one that the server closes as it is reused fails in a way
        # browsers retry silently, and would count here as a connection error the app did not cause.
        device.http.headers["Connection"] = "close"
        return device

    def visit(self, device: Device, url: str, method: str = "GET", data: dict | None = None, follow: bool = True) -> Visit:
        """Send one request and follow its redirects like a browser; stop at the provider's sign-in form."""
        hops: list[Hop] = []
        reply = None
        for _ in range(MAX_HOPS):
            at = time.time()
            try:
                reply = device.http.request(method, url, data=data, allow_redirects=False, timeout=REQUEST_TIMEOUT)
            except requests.RequestException as exc:
                hops.append(Hop(method, url, type(exc).__name__, at))
                return Visit(hops, None)
            hops.append(Hop(method, url, reply.status_code, at))
            self._note(device, url, reply, at)
            if reply.is_redirect and follow:
                url, method, data = urljoin(url, reply.headers["Location"]), "GET", None
                continue
            break
        return Visit(hops, reply)

    def _note(self, device: Device, url: str, reply: requests.Response, at: float) -> None:
        path = urlsplit(url).path
        if path == "/auth/callback":
            if reply.status_code == 302:
                self.sign_ins.append((at, device.number))
                device.signed_in = True
            else:
                self.failed_sign_ins.append((at, device.number, reply.status_code))
        if reply.status_code == 200 and "text/html" in reply.headers.get("Content-Type", ""):
            token = CSRF_INPUT.search(reply.text)
            if token:
                device.csrf = token[1]

    @staticmethod
    def is_form(visit: Visit) -> bool:
        hop = visit.hops[-1] if visit.hops else None
        return bool(hop and hop.method == "GET" and hop.status == 200 and urlsplit(hop.url).path.endswith(AUTHORIZE_PATH))

    def open(self, device: Device, url: str) -> Visit:
        """Navigate to url; if the provider shows its sign-in form, fill it in and carry on, as the person would."""
        first = self.visit(device, url)
        if not self.is_form(first):
            return first
        fields = {k: html.unescape(v) for k, v in HIDDEN_INPUT.findall(first.final.text)}
        second = self.visit(device, first.hops[-1].url, "POST", fields | {"name": self.name, "allow": "1"})
        return Visit(first.hops + second.hops, second.final, form=True)

    def try_again(self, device: Device, failed: Visit, fallback: str) -> Visit:
        """Do what a person does on an error page: click its "Try again" (or reload), and from home go on to the page."""
        link = TRY_AGAIN.search(failed.final.text) if failed.final is not None else None
        visit = self.open(device, urljoin(failed.hops[-1].url, html.unescape(link[1])) if link else fallback)
        if visit.status == 200 and visit.path == "/":
            then = self.open(device, self.base() + "/session")
            visit = Visit(visit.hops + then.hops, then.final, form=visit.form or then.form)
        return visit

    def sign_in(self, device: Device, kind: str = "sign-in", attempts: int = 4) -> list[Visit]:
        """Sign this device in (trying again after an error page, as a person would); return the visits."""
        visits = []
        start = f"{self.base()}/auth/login?next=/session"
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.rng.uniform(1, 3))
            visit = self.try_again(device, visits[-1], start) if visits else self.open(device, start)
            visits.append(visit)
            if visit.landed(PAGES):
                break
        ok = visits[-1].landed(PAGES)
        device.signed_in = ok
        self.record.step(self.number, kind, "/auth/login", visits, ok)
        return visits

    def learn_user_id(self, device: Device) -> None:
        visit = self.visit(device, f"{self.base()}/api/session")
        if visit.status == 200:
            self.user_id = visit.final.json()["user"]["id"]

    # What the person does

    def live(self) -> list[Device]:
        return [d for d in self.devices if d.signed_in]

    def browse(self, device: Device, path: str | None = None) -> None:
        """One page or API call; notice and classify a sign-out the person did not ask for."""
        path = path or self.rng.choices([p for p, _ in BROWSING], [w for _, w in BROWSING])[0]
        visit = self.open(device, self.base() + path)
        visits = [visit]
        signed_out = visit.through_login or visit.form
        if path.startswith("/api/") and visit.status == 401:
            # The page's script finds itself signed out and reloads the page, which sends it to sign in.
            signed_out = True
            visit = self.open(device, self.base() + "/session")
            visits.append(visit)
        if signed_out:
            # An error page on the way back (provider down, say): the person tries again a few times.
            for _ in range(3):
                if visit.landed(PAGES):
                    break
                time.sleep(self.rng.uniform(1, 3))
                visit = self.try_again(device, visit, self.base() + "/session")
                visits.append(visit)
            form = any(v.form for v in visits)
            recovered = visits[-1].landed(PAGES) and not form
            hops = [h for v in visits for h in v.hops]
            seen = next((b.at for a, b in zip(hops, hops[1:], strict=False) if a.status == 401 or urlsplit(b.url).path == "/auth/login"), hops[-1].at)
            silent = any(v.silent_tried for v in visits)
            self.record.add("signouts", SignOut(self.number, device.number, hops[0].at, seen, form, recovered, path, silent, user_id=self.user_id))
            device.signed_in = visits[-1].landed(PAGES)
        ok = visits[-1].landed(PAGES) if path in PAGES or signed_out else visit.status == 200
        self.record.step(self.number, "browse", path, visits, ok)

    def second_device(self) -> None:
        """Sign in on a new device at the moment the other device's access token goes stale."""
        started = time.time()
        others = self.live()
        device = self.new_device()
        visits, callback = self.until_callback(device)
        if callback and others:
            other = others[0]
            self.wait_until_stale(other)
            racers = [lambda: visits.append(self.visit(device, callback)), lambda: self.browse(other, "/api/session")]
            self.together(racers, spread=0.05)
        elif callback:
            visits.append(self.visit(device, callback))
        self.record.step(self.number, "second device", "/auth/login", visits, device.signed_in)
        if not device.signed_in:
            self.sign_in(device, kind="second device")
        self.devices = [*self.live()[-1:], device] if device.signed_in else self.devices  # at most two live devices
        self.windows.append((started, time.time() + 1, "sign-in on a second device"))
        self.record.add("scenarios", {"kind": "sign-in on a second device", "person": self.number, "start": started, "end": time.time()})

    def sign_out_race(self) -> None:
        """One device signs out while another, new one signs in (its callback sent within 30 ms of the sign-out)."""
        started = time.time()
        leaving = self.live()
        device = self.new_device()
        visits, callback = self.until_callback(device)
        if callback and leaving:
            for other in leaving:  # the race is with the person's last session, so sign the others out first
                self.ensure_csrf(other)
            for other in leaving[:-1]:
                self.logout(other)
            last = leaving[-1]
            logout_at: list[float] = []
            racers = [lambda: visits.append(self.visit(device, callback)), lambda: logout_at.append(time.time()) or self.logout(last)]
            self.together(racers, spread=0.03)
            self.race_logouts += logout_at
        elif callback:
            visits.append(self.visit(device, callback))
        self.record.step(self.number, "race sign-in", "/auth/login", visits, device.signed_in)
        if not device.signed_in:
            self.sign_in(device, kind="race sign-in")
        time.sleep(0.5)
        self.devices = [device] if device.signed_in else self.devices
        self.windows.append((started, time.time() + 1, "sign-out race"))
        self.record.add("scenarios", {"kind": "sign-out race", "person": self.number, "start": started, "end": time.time()})
        if device.signed_in:
            self.browse(device, "/session")  # a wiped sign-in shows here

    def until_callback(self, device: Device) -> tuple[list[Visit], str | None]:
        """Go through the provider's sign-in up to (not including) the callback; return the visits and the callback URL."""
        authorize = self.visit(device, f"{self.base()}/auth/login?next=/session")
        if not self.is_form(authorize):
            return [authorize], None
        fields = {k: html.unescape(v) for k, v in HIDDEN_INPUT.findall(authorize.final.text)}
        posted = self.visit(device, authorize.hops[-1].url, "POST", fields | {"name": self.name, "allow": "1"}, follow=False)
        if posted.status != 302:
            return [authorize, posted], None
        return [authorize, posted], urljoin(authorize.hops[-1].url, posted.final.headers["Location"])

    def deliberate_sign_out(self) -> None:
        device = self.rng.choice(self.live())
        self.ensure_csrf(device)
        self.logout(device)
        self.record.deliberate += 1
        time.sleep(self.rng.uniform(2, 5))
        self.sign_in(device, kind="sign-in after sign-out")

    def ensure_csrf(self, device: Device) -> None:
        if not device.csrf:
            self.browse(device, "/session")

    def logout(self, device: Device) -> None:
        visit = self.visit(device, f"{self.base()}/auth/logout", "POST", {"csrf_token": device.csrf})
        device.signed_in = False
        device.csrf = ""
        self.record.step(self.number, "sign-out", "/auth/logout", [visit], visit.status == 200 and visit.path == "/")

    def wait_until_stale(self, device: Device) -> None:
        """Sleep until the device's access token enters the leeway, so that its next request refreshes."""
        visit = self.visit(device, f"{self.base()}/api/session")
        if visit.status != 200:
            return
        expires = datetime.fromisoformat(visit.final.json()["access_token_expires_at"]).timestamp()
        time.sleep(min(TTL - LEEWAY + 1, max(0.0, expires - LEEWAY - time.time() + 0.05)))

    def together(self, actions: list, spread: float) -> None:
        """Run the actions in threads of their own, started within spread seconds of each other in random order."""
        self.rng.shuffle(actions)
        delays = [0.0] + [self.rng.uniform(0, spread) for _ in actions[1:]]
        threads = [threading.Thread(target=lambda a=a, d=d: (time.sleep(d), a())) for a, d in zip(actions, delays, strict=True)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(REQUEST_TIMEOUT * 3)

    def run(self, start_at: float, stop_at: float) -> None:
        time.sleep(max(0.0, start_at - time.time()))
        device = self.new_device()
        self.devices = [device]
        self.sign_in(device, kind="first sign-in")
        self.learn_user_id(device)
        while time.time() < stop_at:
            time.sleep(min(max(0.0, stop_at - time.time()), self.rng.uniform(*THINK_SECONDS)))
            if time.time() >= stop_at:
                break
            if not self.live():
                self.sign_in(self.devices[-1], kind="sign-in again")
                continue
            try:
                order = self.orders.get_nowait()
            except queue.Empty:
                order = None
            if order == "sign-in on a second device":
                self.second_device()
            elif order == "sign-out race":
                self.sign_out_race()
            elif order == "deliberate sign-out":
                self.deliberate_sign_out()
            else:
                self.browse(self.rng.choice(self.live()))
        if self.user_id is None and self.live():
            self.learn_user_id(self.live()[0])

    def final_check(self) -> None:
        """Look at every device that should be signed in once more, so that a sign-out not yet noticed is counted."""
        for device in self.live():
            self.browse(device, "/session")


# --- Faults ------------------------------------------------------------------------------------


class Chaos:
    """Inject one fault at a time at random, recording the window in which it acts."""

    def __init__(self, store: Store, servers: list, postgres: Postgres, record: Record, rng: random.Random, gap: tuple[float, float]):
        self.store, self.servers, self.postgres, self.record, self.rng = store, servers, postgres, record, rng
        self.gap = gap  # seconds between one fault's end and the next one
        self.injected: Counter = Counter()
        self.details: list[str] = []

    def run(self, start_at: float, stop_at: float) -> None:
        time.sleep(max(0.0, start_at - time.time()))
        deck: list[str] = []
        while time.time() < stop_at - 5:
            if not deck:
                deck = list(FAULTS)
                self.rng.shuffle(deck)
            kind = deck.pop()
            started = time.time()
            try:
                detail = self.inject(kind)
            finally:
                self.store.clear_faults()
            ended = time.time()
            self.injected[kind] += 1
            self.record.add("windows", {"kind": kind, "start": started, "end": ended, "detail": detail})
            self.details.append(f"{time.strftime('%H:%M:%S', time.localtime(started))} {kind}: {detail}")
            time.sleep(min(max(0.0, stop_at - time.time()), self.rng.uniform(*self.gap)))

    def inject(self, kind: str) -> str:
        """Cause the fault and return once it has stopped acting (its window's end, with a second of grace)."""
        if kind == "provider 5xx":
            count = self.rng.randint(3, 10)
            self.store.inject("5xx", count)
            self.wait_taken(15)
            time.sleep(1)
            return f"next {count} token requests answer 503"
        if kind == "provider timeout":
            count, delay = self.rng.randint(1, 3), self.rng.choice((3.0, PROVIDER_TIMEOUT + 2.0))
            self.store.inject("timeout", count, delay)
            self.wait_taken(15)
            time.sleep(delay + 2)  # the last one taken hangs this long, and its waiters behind the lock
            return f"next {count} token requests answer after {delay:g} s (PROVIDER_TIMEOUT {PROVIDER_TIMEOUT} s)"
        if kind == "reply dropped after rotation":
            count = self.rng.randint(1, 3)
            self.store.inject("drop", count)
            self.wait_taken(15)
            time.sleep(1)
            return f"next {count} token replies lost after the provider acted"
        if kind == "worker killed mid-refresh":
            # The in-process stand-in hangs before it acts: the worker dies holding the person's row lock.
            self.store.inject("timeout", 1, PROVIDER_TIMEOUT - 2)
            deadline = time.time() + 15
            while not self.store.fault_takers() and time.time() < deadline:
                time.sleep(0.05)
            takers = self.store.fault_takers()
            workers = {pid for server in self.servers for pid in server.workers()}
            if not takers or takers[0] not in workers:
                return "no refresh took the fault in time; nothing killed"
            time.sleep(self.rng.uniform(0.2, 1.5))
            os.kill(takers[0], signal.SIGKILL)
            time.sleep(2)
            return f"SIGKILL to worker {takers[0]} while it waited on the provider"
        if kind == "PostgreSQL restart":
            # The window ends as the server accepts connections again: a stale pooled connection failing later is the app's.
            began = time.time()
            self.postgres.restart()
            return f"pg_ctl restart -m fast took {time.time() - began:.1f} s"
        raise ValueError(kind)

    def wait_taken(self, limit: float) -> None:
        """Wait until every injected fault was taken by a token request (or limit seconds)."""
        deadline = time.time() + limit
        while time.time() < deadline:
            with self.store.engine.connect() as conn:
                if not conn.execute(select(func.coalesce(func.sum(faults.c.remaining), 0))).scalar_one():
                    return
            time.sleep(0.1)


def assign_scenarios(people: list[Person], start_at: float, stop_at: float, interval: float, rng: random.Random) -> None:
    """Hand scenarios to random people at a steady pace: second devices, sign-out races, deliberate sign-outs."""
    time.sleep(max(0.0, start_at - time.time()))
    deck: list[str] = []
    while time.time() < stop_at:
        if not deck:
            deck = list(SCENARIOS)
            rng.shuffle(deck)
        rng.choice(people).orders.put(deck.pop())
        time.sleep(interval)


# --- Reading the servers' logs and classifying --------------------------------------------------


def app_events(paths: list[Path]) -> list[dict]:
    """Read the JSON lines of the app's logger "tokens" (any event), with the time each was written."""
    events = []
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            start = line.find('{"event": ')
            if start < 0:
                continue
            try:
                event = json.loads(line[start:])
                event["logged_at"] = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1000
            except ValueError:
                continue
            events.append(event)
    return sorted(events, key=lambda e: e["logged_at"])


def server_exceptions(paths: list[Path]) -> Counter:
    """Count the exceptions the servers logged with a traceback, by their last line."""
    found: Counter = Counter()
    for path in paths:
        lines = path.read_text(errors="replace").splitlines()
        for i, line in enumerate(lines):
            if line.startswith("Traceback"):
                j = i + 1
                while j < len(lines) and (lines[j].startswith((" ", "\t")) or not lines[j].strip() or lines[j].startswith(("During handling", "The above"))):
                    j += 1
                if j < len(lines):
                    found[lines[j][:160]] += 1
    return found


def is_lost_rotation(event: dict) -> bool:
    """The provider rotated but its reply never reached the app (a timeout after it acted, or a dropped reply)."""
    reason = event.get("reason", "")
    return event.get("outcome") == "lost_rotation" or (event.get("outcome") == "unavailable" and ("ConnectionError" in reason or "Timeout" in reason))


def classify(signout: SignOut, person: Person, events: list[dict], windows: list[dict]) -> None:
    """Name the cause of one sign-out from what happened since the person's refresh token was last stored.

    In order: a lost rotation (the provider rotated, the reply never came: unavoidable); the latest
    sign-out or sign-in of another of the person's devices; the fault that was active; else none.
    """
    # What the app logged up to the answer that showed the sign-out, including the refresh that failed then.
    mine = [e for e in events if e.get("user_id") == person.user_id and e["logged_at"] <= signout.seen + 0.05]
    stored = [e["logged_at"] for e in mine if e.get("outcome") == "refreshed" and e["logged_at"] < signout.at]
    stored += [at for at, _ in person.sign_ins if at <= signout.at]
    since = max(stored, default=0.0) - 1.0  # a second of slack between the servers' and the people's clocks
    lost = [e["logged_at"] for e in mine if e["logged_at"] >= since and is_lost_rotation(e)]
    # A sign-in whose code the provider redeemed (revoking the person's refresh token) while the reply was lost.
    replies_lost = ("reply dropped after rotation", "provider timeout")
    lost_windows = [(w["start"], w["end"]) for w in windows if w["kind"] in replies_lost]
    lost += [at for at, _, _ in person.failed_sign_ins if since <= at <= signout.seen and any(a <= at <= b for a, b in lost_windows)]
    others = [(at, "sign-out race") for at in person.race_logouts] + [(at, "sign-in on a second device") for at, d in person.sign_ins if d != signout.device]
    others = [o for o in others if since <= o[0] <= signout.seen]  # up to the answer: a sign-in may race the very step
    active = [w["kind"] for w in windows if w["start"] <= signout.seen and w["end"] >= since]
    if lost:
        kinds = [w["kind"] for w in windows if w["start"] - 1 <= lost[0] <= w["end"] + 1]
        signout.cause = next((k for k in replies_lost if k in kinds), "no fault active")
        signout.unavoidable = True
        signout.evidence = "the provider rotated and its reply was lost"
    elif others:
        at, signout.cause = max(others)
        signout.evidence = f"another device {'signed out' if signout.cause == 'sign-out race' else 'signed in'} {signout.at - at:+.3f} s before"
    elif active:
        order = ("PostgreSQL restart", "worker killed mid-refresh", "reply dropped after rotation", "provider timeout", "provider 5xx")
        signout.cause = min(active, key=order.index)
        signout.evidence = "the fault was active since the token was stored"
    else:
        signout.cause, signout.evidence = "no fault active", "nothing the soak did explains it"
    outcomes = Counter(e.get("outcome") for e in mine if e["logged_at"] >= since)
    signout.evidence += f"; app events since: {dict(outcomes)}"


def in_window(step: dict, windows: list[tuple[float, float]]) -> bool:
    return any(step["start"] <= end and step["end"] >= start for start, end in windows)


def summarize(record: Record, people: list[Person], events: list[dict], store: Store, chaos: Chaos, settings: dict, exceptions: Counter) -> dict:
    global_windows = [(w["start"], w["end"]) for w in record.windows]
    by_person = {p.number: p for p in people}
    for signout in record.signouts:
        classify(signout, by_person[signout.person], events, record.windows)
    causes = {c: {"sign_outs": 0, "lost": 0, "recovered": 0, "unavoidable": 0, "unavoidable_recovered": 0} for c in CAUSES}
    for s in record.signouts:
        row = causes[s.cause]
        row["sign_outs"] += 1
        row["lost"] += s.form or not s.recovered
        row["recovered"] += s.recovered and not s.form
        row["unavoidable"] += s.unavoidable
        row["unavoidable_recovered"] += s.unavoidable and s.recovered and not s.form
    for step in record.steps:
        step["outside"] = not in_window(step, global_windows + [(a, b) for a, b, _ in by_person[step["person"]].windows])
    outside = [s for s in record.steps if s["outside"]]
    server_errors_outside = [(s["path"], h) for s in outside for h in s["hops"] if isinstance(h[2], int) and h[2] >= 500]
    server_errors_inside = [h for s in record.steps if not s["outside"] for h in s["hops"] if isinstance(h[2], int) and h[2] >= 500]
    connection_errors = [(s["outside"], h) for s in record.steps for h in s["hops"] if isinstance(h[2], str)]
    lost_other = sum(1 for s in record.signouts if (s.form or not s.recovered) and not s.unavoidable)
    unavoidable = [s for s in record.signouts if s.unavoidable]
    return {
        "settings": settings,
        "faults_injected": dict(chaos.injected),
        "scenarios": dict(Counter(s["kind"] for s in record.scenarios)) | {"deliberate sign-out": record.deliberate},
        "postgres_restarts": chaos.postgres.restarts,
        "causes": causes,
        "sign_outs": len(record.signouts),
        "lost_other_than_unavoidable": lost_other,
        "unavoidable": len(unavoidable),
        "unavoidable_recovered": sum(1 for s in unavoidable if s.recovered and not s.form),
        "silent_tried": sum(1 for s in record.signouts if s.silent_tried),
        "steps": len(record.steps),
        "steps_outside_windows": len(outside),
        "success_rate_outside_windows": sum(s["ok"] for s in outside) / len(outside) if outside else float("nan"),
        "failed_outside_windows": Counter(f"{s['kind']} {s['path']} -> {s['hops'][-1][2]}" for s in outside if not s["ok"]).most_common(12),
        "server_errors_outside_windows": len(server_errors_outside),
        "server_errors_outside_detail": Counter(f"{m} {p} {st}" for _, (m, p, st, _) in server_errors_outside).most_common(12),
        "server_errors_inside_windows": dict(Counter(h[2] for h in server_errors_inside)),
        "connection_errors": {"outside": sum(1 for o, _ in connection_errors if o), "inside": sum(1 for o, _ in connection_errors if not o)},
        "app_refresh_outcomes": dict(Counter(e.get("outcome") for e in events if e["event"] == "token_refresh")),
        "app_other_events": dict(Counter(e["event"] for e in events if e["event"] != "token_refresh")),
        "provider": {"refreshes": store.count("refresh"), "rejected": store.count("refresh_rejected"), "codes": store.count("code")},
        "server_exceptions": exceptions.most_common(12),
        "fault_log": chaos.details,
    }


def markdown(r: dict) -> str:
    """Render the soak's result as the README's table."""
    s = r["settings"]
    out = [
        f"**Fault soak** ({s['people']} people, {s['duration']:.0f} s, 2 instances x {s['workers']} workers x {s['threads']} threads, "
        f"own PostgreSQL {s['postgresql']} restarted {r['postgres_restarts']} times, strict stand-in on SQLite, access tokens stale every "
        f"{TTL - LEEWAY} s; `{s['command']}`)",
        "",
        "| cause | injected | sign-outs | lost (saw the sign-in form) | recovered silently | unavoidable (recovered) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    injected = r["faults_injected"] | r["scenarios"]
    for cause, row in r["causes"].items():
        unavoidable = f"{row['unavoidable']} ({row['unavoidable_recovered']})"
        out.append(f"| {cause} | {injected.get(cause, '')} | {row['sign_outs']} | {row['lost']} | {row['recovered']} | {unavoidable} |")
    total = {k: sum(row[k] for row in r["causes"].values()) for k in ("sign_outs", "lost", "recovered", "unavoidable", "unavoidable_recovered")}
    out.append(f"| **all** | | {total['sign_outs']} | {total['lost']} | {total['recovered']} | {total['unavoidable']} ({total['unavoidable_recovered']}) |")
    rate = r["success_rate_outside_windows"]
    out += [
        "",
        "| measure | result | target |",
        "|---|---:|---:|",
        f"| sign-ins lost other than unavoidable | {r['lost_other_than_unavoidable']} | 0 |",
        f"| unavoidable sign-outs recovered silently | {r['unavoidable_recovered']} of {r['unavoidable']} | all |",
        f"| requests (page or API call with its redirects) outside fault windows | {r['steps_outside_windows']:,} of {r['steps']:,} | |",
        f"| success rate outside fault windows | {rate:.2%} | 100% |",
        f"| server errors (5xx) outside fault windows | {r['server_errors_outside_windows']} | 0 |",
        f"| server errors inside fault windows | {sum(r['server_errors_inside_windows'].values())} "
        f"({', '.join(f'{k}: {v}' for k, v in sorted(r['server_errors_inside_windows'].items()))}) | |",
        f"| connection errors outside / inside fault windows | {r['connection_errors']['outside']} / {r['connection_errors']['inside']} | |",
        f"| deliberate sign-outs (not losses) | {r['scenarios'].get('deliberate sign-out', 0)} | |",
        f"| refreshes at the provider / rejected | {r['provider']['refreshes']:,} / {r['provider']['rejected']} | |",
        f"| app refresh outcomes | {', '.join(f'{k} {v}' for k, v in sorted(r['app_refresh_outcomes'].items()))} | |",
        f"| other app events | {', '.join(f'{k} {v}' for k, v in sorted(r['app_other_events'].items())) or 'none'} | |",
        "",
    ]
    return "\n".join(out)


# --- Putting it together ------------------------------------------------------------------------


def run(folder: Path, quick: bool = False, people: int | None = None, duration: float | None = None, seed: int | None = None, command: str = "") -> dict:
    """Start PostgreSQL, two instances and the people; inject faults for duration seconds; return the summary."""
    people = people or (30 if quick else 200)
    duration = duration or (60.0 if quick else 300.0)
    seed = seed if seed is not None else random.randrange(1_000_000)
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    postgres = Postgres()
    servers = []
    try:
        postgres.start()
        ports = [free_port(), free_port()]
        env = bench_env(
            folder,
            postgres.url,
            ports[0],
            STANDIN_ACCESS_TOKEN_TTL=str(TTL),
            TOKEN_REFRESH_LEEWAY=str(LEEWAY),
            STANDIN_DATABASE_URL=f"sqlite:///{folder / 'standin.sqlite'}",
            # One public callback for both instances, as behind a balancer; the stand-in allows only registered ones.
            OAUTH_REDIRECT_URI=f"http://127.0.0.1:{ports[0]}/auth/callback",
        )
        logs = [folder / f"gunicorn-{i + 1}.log" for i in range(2)]
        servers = [start_server(env, port, log, workers=WORKERS, threads=THREADS) for port, log in zip(ports, logs, strict=True)]
        store = Store(env["STANDIN_DATABASE_URL"])
        record = Record()
        run_id = f"{seed:06d}"
        crowd = [Person(i, run_id, [s.url for s in servers], record, rng.randrange(1 << 30)) for i in range(people)]
        chaos = Chaos(store, servers, postgres, record, random.Random(rng.randrange(1 << 30)), gap=(2, 5) if quick else (4, 9))

        begin = time.time() + 1
        ramp = min(20.0, duration * 0.15)  # people arrive over this time, and faults wait for them
        stop = begin + duration
        settle = 15.0 if duration >= 120 else 8.0  # no new fault this long before the end
        threads = [threading.Thread(target=p.run, args=(begin + ramp * i / people, stop), daemon=True) for i, p in enumerate(crowd)]
        threads.append(threading.Thread(target=chaos.run, args=(begin + ramp, stop - settle), daemon=True))
        # About 90 scenarios in a full run (15 in a quick one), and no more than one per person every 30 s.
        interval = max(duration / (15 if quick else 90), 30 / people)
        threads.append(
            threading.Thread(target=assign_scenarios, args=(crowd, begin + ramp, stop - settle, interval, random.Random(rng.randrange(1 << 30))), daemon=True)
        )
        print(f"soak: {people} people, {duration:.0f} s, seed {seed}, logs in {folder}", file=sys.stderr)
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(1.0, stop + 120 - time.time()))
        checks = [threading.Thread(target=p.final_check, daemon=True) for p in crowd]
        for thread in checks:
            thread.start()
        for thread in checks:
            thread.join(max(1.0, stop + 240 - time.time()))
        time.sleep(0.5)  # let the servers write their last log lines
        events = app_events(logs)
        version = server_version(postgres.url)
        settings = {"people": people, "duration": duration, "seed": seed, "workers": WORKERS, "threads": THREADS, "postgresql": version, "command": command}
        result = summarize(record, crowd, events, store, chaos, settings, server_exceptions(logs))
        with open(folder / "signouts.jsonl", "w") as out:
            for s in record.signouts:
                out.write(json.dumps(s.__dict__) + "\n")
        with open(folder / "people.jsonl", "w") as out:
            for p in crowd:
                fields = ("number", "name", "user_id", "sign_ins", "failed_sign_ins", "race_logouts", "windows")
                out.write(json.dumps({k: getattr(p, k) for k in fields}) + "\n")
        with open(folder / "steps.jsonl", "w") as out:
            for step in record.steps:
                out.write(json.dumps(step) + "\n")
        (folder / "windows.json").write_text(json.dumps(record.windows, indent=1))
        return result
    finally:
        for server in servers:
            server.stop()
        postgres.stop(keep_log=folder / "postgresql.log")


def server_version(url: str) -> str:
    import psycopg

    with psycopg.connect(url.replace("+psycopg", "")) as conn:
        return conn.execute("SHOW server_version").fetchone()[0].split()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="30 people for 60 seconds")
    parser.add_argument("--people", type=int, default=None, help="simulated people (default 200; quick 30)")
    parser.add_argument("--duration", type=float, default=None, help="seconds of browsing (default 300; quick 60)")
    parser.add_argument("--seed", type=int, default=None, help="repeat a run's random choices (not its timings: threads and servers race anew)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run as root: initdb and pg_ctl are started as the postgres user through runuser")
    folder = workdir("soak-quick" if args.quick else "soak")
    command = "bench/soak.py " + " ".join(sys.argv[1:])
    result = run(folder, args.quick, args.people, args.duration, args.seed, command=command.strip())
    (folder / "results.json").write_text(json.dumps(result, indent=2, default=str))
    report = markdown(result)
    (folder / "summary.md").write_text(report)
    print(report)
    print(
        json.dumps({k: result[k] for k in ("failed_outside_windows", "server_errors_outside_detail", "server_exceptions", "fault_log")}, indent=1),
        file=sys.stderr,
    )
    print(f"raw results: {folder}", file=sys.stderr)


if __name__ == "__main__":
    main()
