"""The operator's view of real gunicorn workers: a real Prometheus scraping /metrics, and JSON log lines."""

import json
import os
import signal
import subprocess
import time
from contextlib import nullcontext
from datetime import datetime

import pytest
import requests
import yaml

from conftest import fresh_postgres_database
from servers import ROOT, Gunicorn, burst, free_port, http_sign_in, migrate, server_env
from standin.store import Store

pytestmark = pytest.mark.slow

PROMETHEUS = "/usr/bin/prometheus"
LEEWAY = 60
# Access tokens count as expired 2 seconds after they are issued: a refresh at every round.
TTL = 62


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, tmp_path_factory):
    """One gunicorn (3 workers x 4 threads) with JSON logs behind a trusted proxy, shared by this module's tests."""
    tmp = tmp_path_factory.mktemp("observability")
    port = free_port()
    database = fresh_postgres_database("signin_obs") if request.param == "postgresql" else nullcontext(f"sqlite:///{tmp / 'app.sqlite'}")
    with database as database_url:
        env = server_env(
            tmp,
            database_url,
            f"http://127.0.0.1:{port}/standin",
            STANDIN_ACCESS_TOKEN_TTL=str(TTL),
            TOKEN_REFRESH_LEEWAY=str(LEEWAY),
            LOG_FORMAT="json",
            TRUSTED_PROXY_COUNT="1",
        )
        migrate(env)
        gunicorn = Gunicorn(env, port, tmp / "gunicorn.log", workers=3, target="tests.fault_app:app").start()
        gunicorn.store = Store(env["STANDIN_DATABASE_URL"])
        try:
            yield gunicorn
        finally:
            gunicorn.kill()


@pytest.fixture
def prometheus(server, tmp_path):
    """Start Debian's Prometheus with deploy/prometheus.yml pointed at the test's gunicorn, scraping every second."""
    if not os.path.exists(PROMETHEUS):
        if os.environ.get("CI"):
            pytest.fail("CI needs Debian's prometheus package (.ci/run installs it)")
        pytest.skip("prometheus is not installed")
    settings = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    settings["global"]["scrape_interval"] = "1s"
    (job,) = settings["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    del job["dns_sd_configs"]  # the compose stack's replicas; here the one gunicorn
    job["static_configs"] = [{"targets": [f"127.0.0.1:{server.port}"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(settings))
    port = free_port()
    with open(tmp_path / "prometheus.log", "wb") as log:
        process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: _get(f"{url}/-/ready") == 200, f"Prometheus did not start: {(tmp_path / 'prometheus.log').read_text()[-1500:]}")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)


def _get(url: str) -> int | None:
    try:
        return requests.get(url, timeout=2).status_code
    except requests.RequestException:
        return None


def _wait_for(done, message: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return
        time.sleep(0.2)
    pytest.fail(message)


def query(prometheus: str, expression: str) -> float | None:
    """Ask Prometheus's HTTP API for an instant value; None while it has no sample."""
    reply = requests.get(f"{prometheus}/api/v1/query", params={"query": expression}, timeout=10).json()
    assert reply["status"] == "success", reply
    result = reply["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def wait_for_expiry(browser: requests.Session, base_url: str) -> None:
    """Sleep until the person's access token enters the leeway, so the next request must refresh."""
    expires = datetime.fromisoformat(browser.get(f"{base_url}/api/session", timeout=30).json()["access_token_expires_at"])
    time.sleep(max(0.0, expires.timestamp() - LEEWAY - time.time()) + 0.3)


def test_prometheus_counts_each_refresh_the_provider_saw_once(server, prometheus):
    """Concurrent requests at three expiries over 3 workers: Prometheus's sum of refreshes is the stand-in's count."""
    browser = http_sign_in(server.url, name="Grace Hopper")
    for _ in range(3):
        wait_for_expiry(browser, server.url)
        assert burst(browser, [f"{server.url}/api/profile", f"{server.url}/"], count=12) == [200] * 12
    refreshes = server.store.count("refresh")
    assert refreshes >= 4  # the viewer token's at sign-in, and one per expiry

    counted = 'sum(signin_token_refreshes_total{outcome="refreshed"})'
    _wait_for(lambda: query(prometheus, counted) == refreshes, f"Prometheus counted {query(prometheus, counted)} refreshes, the provider saw {refreshes}")
    # Every refresh's time, provider included, went into the histogram (and nothing else did in this test module).
    assert query(prometheus, "sum(signin_token_refresh_seconds_count)") == refreshes
    assert query(prometheus, 'sum(signin_sign_ins_total{how="interactive"})') >= 1
    assert query(prometheus, "max(signin_sessions_live)") >= 1

    # A worker that dies keeps its counts in the sum; its replacement counts from there on.
    (victim, *_) = server.workers()
    os.kill(victim, signal.SIGKILL)
    _wait_for(lambda: victim not in server.workers() and len(server.workers()) == 3, "gunicorn did not replace the killed worker")
    wait_for_expiry(browser, server.url)
    assert burst(browser, [f"{server.url}/api/profile"], count=12) == [200] * 12
    refreshes = server.store.count("refresh")
    _wait_for(lambda: query(prometheus, counted) == refreshes, f"Prometheus counted {query(prometheus, counted)} refreshes, the provider saw {refreshes}")


def log_lines(server: Gunicorn) -> list[dict]:
    """Read every line gunicorn's processes wrote so far, each as the JSON object it must be."""
    lines = server.log_path.read_text().splitlines()
    objects = []
    for line in lines:
        try:
            objects.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not one JSON object: {line!r}")
    return objects


def wait_for_lines(server: Gunicorn, request_id: str, count: int) -> list[dict]:
    """Return the log lines carrying this request id, once there are count of them (the access line comes last)."""
    found: list[dict] = []

    def enough() -> bool:
        found[:] = [line for line in log_lines(server) if line.get("request_id") == request_id]
        return len(found) >= count

    _wait_for(enough, f"expected {count} lines of request {request_id}, found {found}", timeout=10)
    return found


def test_every_line_is_json_and_a_traceback_is_one_object(server):
    """gunicorn's messages, the access log and the app's error with its traceback: every line one JSON object."""
    reply = requests.get(f"{server.url}/test-fault", headers={"X-Request-ID": "fault-1"}, timeout=30)
    assert reply.status_code == 500
    assert reply.headers["X-Request-ID"] == "fault-1"
    error, access = wait_for_lines(server, "fault-1", 2)
    assert error["level"] == "ERROR" and "RuntimeError: a fault the log test asked for" in error["exc_info"]
    assert error["exc_info"].startswith("Traceback (most recent call last):")
    assert access["logger"] == "gunicorn.access"
    assert (access["method"], access["path"], access["status"]) == ("GET", "/test-fault", 500)
    everything = log_lines(server)
    assert {"gunicorn.error", "gunicorn.access", "app"} <= {line["logger"] for line in everything}
    assert any(line["message"].startswith("Booting worker") for line in everything)
    assert not any("Traceback" in line["message"] for line in everything)  # never a traceback's lines on their own


def test_a_requests_lines_share_its_id(server):
    """A request that refreshes: the refresh event and the access line carry the id the trusted proxy sent, as fields."""
    browser = http_sign_in(server.url, name="Katherine Johnson")
    wait_for_expiry(browser, server.url)
    reply = browser.get(f"{server.url}/api/profile", headers={"X-Request-ID": "refresh-1"}, timeout=30)
    assert reply.status_code == 200 and reply.headers["X-Request-ID"] == "refresh-1"
    lines = wait_for_lines(server, "refresh-1", 2)
    assert [line["logger"] for line in lines] == ["tokens", "gunicorn.access"]
    assert lines[0]["event"] == "token_refresh" and lines[0]["outcome"] == "refreshed"


def test_request_ids_are_made_when_missing_or_malformed(server):
    """Without a usable X-Request-ID a new id is made, echoed, and logged; the access log keeps escaping the path."""
    made = requests.get(f"{server.url}/healthz", timeout=30).headers["X-Request-ID"]
    forged = requests.get(f"{server.url}/healthz%0a{{}}", headers={"X-Request-ID": 'x" 1\t'}, timeout=30).headers["X-Request-ID"]
    assert len(made) == len(forged) == 32 and made != forged
    (access,) = wait_for_lines(server, forged, 1)
    assert access["path"] == "/healthz%0A%7B%7D"
