"""Single-flight refresh across real gunicorn workers and instances, against a strict provider."""

import os
import signal
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import NullPool, create_engine, update

from models import User
from servers import Gunicorn, burst, free_port, http_sign_in, server_env
from standin.store import Store

pytestmark = pytest.mark.slow

LEEWAY = 60
# Access tokens live 65 s and count as expired 60 s early: a new expiry every 5 seconds.
TTL = 65


def make_due(database_url: str) -> None:
    """Move the person's access token into the leeway in the database, i.e. the next request must refresh."""
    engine = create_engine(database_url, poolclass=NullPool)
    with engine.begin() as conn:
        conn.execute(update(User).values(access_expires_at=datetime.now(UTC) + timedelta(seconds=LEEWAY - 1)))
    engine.dispose()


@pytest.fixture
def instance(tmp_path, database_url):
    """Start app instances on this test's database, all sharing one stand-in provider."""
    started: list[Gunicorn] = []
    issuer_port = free_port()
    env = server_env(tmp_path, database_url, f"http://127.0.0.1:{issuer_port}/standin", STANDIN_ACCESS_TOKEN_TTL=str(TTL), TOKEN_REFRESH_LEEWAY=str(LEEWAY))

    def start(port: int | None = None, workers: int = 3, **extra: str) -> Gunicorn:
        port = port or (issuer_port if not started else free_port())
        server = Gunicorn(env | extra, port, tmp_path / f"gunicorn-{port}.log", workers=workers).start()
        started.append(server)
        return server

    start.store = Store(env["STANDIN_DATABASE_URL"])
    start.make_due = lambda: make_due(database_url)
    yield start
    for server in started:
        server.stop()


def test_gunicorn_workers_refresh_once_per_expiry(instance):
    """3 workers x 4 threads, 50 concurrent requests at each of 5 expiries: no failure, one refresh each."""
    server = instance()
    store = instance.store
    browser = http_sign_in(server.url)
    for _ in range(5):
        instance.make_due()
        before = store.count("refresh")
        statuses = burst(browser, [f"{server.url}/api/profile", f"{server.url}/"])
        assert statuses == [200] * 50
        assert store.count("refresh") - before == 1
    assert store.count("refresh_rejected") == 0


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)  # instances on several machines share PostgreSQL
def test_two_instances_share_one_refresh_per_expiry(instance):
    """Two gunicorn instances on two ports share one database, like machines behind a balancer."""
    first = instance(workers=2)
    second = instance()
    store = instance.store
    browser = http_sign_in(first.url)
    for _ in range(3):
        instance.make_due()
        before = store.count("refresh")
        urls = [f"{first.url}/api/profile", f"{second.url}/api/profile", f"{second.url}/"]
        assert burst(browser, urls) == [200] * 50
        assert store.count("refresh") - before == 1
    assert store.count("refresh_rejected") == 0


def test_worker_killed_while_holding_the_lock(instance):
    """SIGKILL the worker stuck in a refresh: the database frees its lock and the others carry on."""
    server = instance(PROVIDER_TIMEOUT="20")
    store = instance.store
    browser = http_sign_in(server.url)
    instance.make_due()
    store.inject("timeout", delay=8)  # the provider hangs inside the refresh, after the lock is taken
    before = store.count("refresh")

    stuck: list[int | str] = []
    holder = threading.Thread(target=lambda: stuck.extend(burst(browser, [f"{server.url}/api/profile"], count=1)))
    holder.start()
    deadline = time.monotonic() + 20
    while not store.fault_takers() and time.monotonic() < deadline:
        time.sleep(0.05)
    (victim,) = store.fault_takers()
    assert victim in server.workers()

    # Others queue behind the lock, then the holder dies mid-refresh.
    waiters: list[int | str] = []
    queued = threading.Thread(target=lambda: waiters.extend(burst(browser, [f"{server.url}/api/profile"], count=10)))
    queued.start()
    time.sleep(0.5)
    os.kill(victim, signal.SIGKILL)
    holder.join()
    queued.join()

    assert stuck != [200]  # the killed request itself is lost
    # Requests that landed on the killed worker die with it; every other one succeeds.
    assert set(waiters) <= {200, "ConnectionError"} and 200 in waiters
    assert browser.get(f"{server.url}/api/profile", timeout=30).status_code == 200
    # The provider never rotated in the dead worker, so the kept token still worked: one refresh, no sign-out.
    assert store.count("refresh") - before == 1
    assert store.count("refresh_rejected") == 0


def test_restart_between_requests_keeps_person_signed_in(instance):
    server = instance()
    browser = http_sign_in(server.url)
    server.stop()
    restarted = instance(port=server.port)
    assert browser.get(f"{restarted.url}/api/session", timeout=30).json()["user"]["name"] == "Ada Lovelace"
    instance.make_due()
    assert browser.get(f"{restarted.url}/api/profile", timeout=30).status_code == 200
