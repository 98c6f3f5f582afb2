"""Single-flight refresh across real gunicorn workers and instances, against a strict provider."""

import os
import signal
import threading
import time

import pytest
import requests

from pgbouncer import EVERY_DATABASE, POSTGRESQL_AND_PGBOUNCER, pgbouncer_server, pooler  # noqa: F401 (fixtures used by name)
from servers import Gunicorn, burst, expire_access_token_in, http_sign_in, instances

pytestmark = pytest.mark.slow

LEEWAY = 60
# Access tokens live 65 s and count as expired 60 s early: a new expiry every 5 seconds.
TTL = 65


@pytest.fixture
def instance(tmp_path, database_url, pooler):  # noqa: F811 (the pooler fixture, imported above)
    """Start app instances on this test's database (through PgBouncer for the pooler's variant), sharing one stand-in provider."""
    served_url = pooler.url_for(database_url) if pooler is not None else database_url
    with instances(tmp_path, served_url, STANDIN_ACCESS_TOKEN_TTL=str(TTL), TOKEN_REFRESH_LEEWAY=str(LEEWAY)) as start:
        # Into the leeway in the database: the next request must refresh.
        start.make_due = lambda: expire_access_token_in(database_url, LEEWAY - 1)
        yield start


@EVERY_DATABASE
def test_gunicorn_workers_refresh_once_per_expiry(instance, pooler):  # noqa: F811 (the fixture)
    """3 workers x 4 threads, 50 concurrent requests at each of 5 expiries (3 through the pooler): no failure, one refresh each."""
    server = instance()
    store = instance.store
    browser = http_sign_in(server.url)
    for _ in range(3 if pooler else 5):
        instance.make_due()
        before = store.count("refresh")
        statuses = burst(browser, [f"{server.url}/api/profile", f"{server.url}/"])
        assert statuses == [200] * 50
        assert store.count("refresh") - before == 1
    assert store.count("refresh_rejected") == 0


@POSTGRESQL_AND_PGBOUNCER  # instances on several machines share PostgreSQL
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


@EVERY_DATABASE
def test_restart_between_requests_keeps_person_signed_in(instance):
    server = instance()
    browser = http_sign_in(server.url)
    server.stop()
    restarted = instance(port=server.port)
    assert browser.get(f"{restarted.url}/api/session", timeout=30).json()["user"]["name"] == "Ada Lovelace"
    instance.make_due()
    assert browser.get(f"{restarted.url}/api/profile", timeout=30).status_code == 200


# --- Stops: what an orchestrator does to an instance while a refresh's reply is on its way ----------------


def hold_a_refresh(instance, server: Gunicorn, browser: requests.Session, seconds: float) -> tuple[threading.Thread, list]:
    """Make the person's token due and start a request whose refresh waits seconds at the provider; return once it waits."""
    store = instance.store
    instance.make_due()
    store.inject("timeout", delay=seconds)  # slow, then the provider rotates and answers
    answers: list[int | str] = []
    holder = threading.Thread(target=lambda: answers.extend(burst(browser, [f"{server.url}/api/profile"], count=1)))
    holder.start()
    deadline = time.monotonic() + 20
    while not store.fault_takers():
        assert time.monotonic() < deadline, "the refresh never reached the provider"
        time.sleep(0.05)
    return holder, answers


@POSTGRESQL_AND_PGBOUNCER
def test_sigterm_lets_a_refresh_in_flight_store_its_rotation_and_turns_readiness_off(instance):
    """docker stop / Kubernetes: SIGTERM, /readyz answers 503 at once, the held refresh finishes and is stored."""
    server = instance(workers=1)
    store = instance.store
    browser = http_sign_in(server.url)
    before = store.count("refresh")
    holder, answers = hold_a_refresh(instance, server, browser, seconds=4)
    probe = requests.Session()  # a balancer's kept-alive connection to this instance
    assert probe.get(f"{server.url}/readyz", timeout=10).status_code == 200

    server.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 2  # gunicorn answers on a kept-alive connection for 2 s after the stop begins
    while (ready := probe.get(f"{server.url}/readyz", timeout=10)).status_code == 200:
        assert time.monotonic() < deadline, "readiness stayed on during the graceful stop"
        time.sleep(0.05)
    assert ready.status_code == 503 and ready.json()["reason"] == "shutting_down"
    holder.join()
    assert answers == [200]  # the request in flight was served in full
    assert server.process.wait(timeout=60) == 0
    assert store.count("refresh") - before == 1

    restarted = instance(port=server.port, workers=1)
    assert browser.get(f"{restarted.url}/api/profile", timeout=30).status_code == 200
    # The rotated token is the one in use: the strict provider saw no replay of the one before it (a
    # restart slower than the token's 5 fresh seconds refreshes again, with the stored token).
    assert store.count("refresh_rejected") == 0


@POSTGRESQL_AND_PGBOUNCER
def test_sigkill_of_the_instance_during_a_held_refresh_recovers_at_restart(instance):
    """A host lost or an OOM kill: every process of the instance dies mid-refresh; the restart refreshes once, nobody signs in again."""
    server = instance(workers=1)
    store = instance.store
    browser = http_sign_in(server.url)
    before = store.count("refresh")
    holder, answers = hold_a_refresh(instance, server, browser, seconds=8)

    server.kill()
    holder.join()
    assert answers != [200]

    restarted = instance(port=server.port, workers=1)
    assert browser.get(f"{restarted.url}/api/profile", timeout=30).status_code == 200
    # The embedded provider died with the instance before it rotated: the kept token was still good.
    assert store.count("refresh") - before == 1
    assert store.count("refresh_rejected") == 0
