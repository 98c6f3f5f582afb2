"""GET /metrics: who may read it, what it counts, and the Grafana dashboard built on it."""

import json
import re
import shutil
import subprocess

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

import config
from conftest import expire_access_token, sign_in
from servers import ROOT

# The sample names each kind of metric family shows in the text format.
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def scrape(client, remote: str = "127.0.0.1"):
    return client.get("/metrics", environ_base={"REMOTE_ADDR": remote})


def counted(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def exposed(text: str) -> set[str]:
    """Return every sample name the text format can show for the families in it."""
    return {family.name + suffix for family in text_string_to_metric_families(text) for suffix in SUFFIXES.get(family.type, ("",))}


def test_metrics_answer_the_loopback_in_the_prometheus_format(client):
    sign_in(client)
    reply = scrape(client)
    assert reply.status_code == 200
    assert reply.content_type.startswith("text/plain; version=")
    families = {family.name: family for family in text_string_to_metric_families(reply.get_data(as_text=True))}
    assert families["signin_sessions_live"].samples[0].value == 1
    assert {"signin_token_refreshes", "signin_token_refresh_seconds", "signin_refresh_wait_seconds", "signin_sign_ins", "signin_sign_outs"} <= set(families)
    assert scrape(client, "::1").status_code == 200


def test_metrics_are_not_found_by_anyone_else(app_factory, monkeypatch):
    """Beyond the loopback, only METRICS_ALLOW's networks read /metrics; everyone else sees nothing there."""
    assert scrape(app_factory().test_client(), "203.0.113.7").status_code == 404
    monkeypatch.setenv("METRICS_ALLOW", "203.0.113.0/24, 10.0.0.0/8")
    client = app_factory().test_client()
    assert scrape(client, "203.0.113.7").status_code == 200
    assert scrape(client, "10.1.2.3").status_code == 200
    assert scrape(client, "198.51.100.7").status_code == 404
    assert scrape(client, "not an address").status_code == 404


def test_a_scrape_does_not_touch_the_sign_in(app, client, standin):
    """A scrape carrying a session cookie with an expired access token refreshes nothing: the hook skips /metrics."""
    sign_in(client)
    expire_access_token(app)
    before = standin.count("refresh")
    assert scrape(client).status_code == 200
    assert standin.count("refresh") == before
    assert client.get("/api/profile").status_code == 200
    assert standin.count("refresh") == before + 1


def test_sign_ins_refreshes_and_sign_outs_are_counted(app, client):
    interactive = counted("signin_sign_ins_total", how="interactive")
    refreshed = counted("signin_token_refreshes_total", kind="access", outcome="refreshed")
    device = counted("signin_sign_outs_total", how="device")
    sign_in(client)
    expire_access_token(app)
    assert client.get("/api/profile").status_code == 200
    csrf = client.get("/api/session").get_json()["csrf_token"]
    assert client.post("/auth/logout", data={"csrf_token": csrf}).status_code == 302
    assert counted("signin_sign_ins_total", how="interactive") == interactive + 1
    assert counted("signin_token_refreshes_total", kind="access", outcome="refreshed") == refreshed + 1
    assert counted("signin_sign_outs_total", how="device") == device + 1


def test_failed_refreshes_are_counted_by_their_outcome(app, client, standin):
    """The outcome label is the one the refresh event records: unavailable, then invalid_grant."""
    unavailable = counted("signin_token_refreshes_total", kind="access", outcome="unavailable")
    invalid = counted("signin_token_refreshes_total", kind="access", outcome="invalid_grant")
    sign_in(client)
    expire_access_token(app)
    standin.inject("5xx")
    assert client.get("/api/profile").status_code == 503
    standin.inject("invalid_grant")
    assert client.get("/api/profile").status_code == 401
    assert counted("signin_token_refreshes_total", kind="access", outcome="unavailable") == unavailable + 1
    assert counted("signin_token_refreshes_total", kind="access", outcome="invalid_grant") == invalid + 1


def test_proxy_answers_are_counted_by_status(client):
    before = counted("signin_proxy_requests_total", status="401")
    assert client.get("/api/aps/project/v1/hubs").status_code == 401  # not signed in
    assert counted("signin_proxy_requests_total", status="401") == before + 1


@pytest.mark.parametrize("value", ["10.0.0.1/8", "everyone", "10.0.0.0/33"])
def test_metrics_allow_refuses_what_is_not_a_network(tmp_path, value):
    with pytest.raises(config.ConfigError, match="METRICS_ALLOW"):
        config.load({"METRICS_ALLOW": value}, str(tmp_path))


def dashboard_queries() -> list[str]:
    dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_every_dashboard_query_names_a_metric_that_metrics_exposes(client):
    names = exposed(scrape(client).get_data(as_text=True))
    queries = dashboard_queries()
    assert len(queries) >= 8
    for expression in queries:
        used = set(re.findall(r"\bsignin_[a-z_]+", expression))
        assert used, expression
        assert used <= names, f"{expression} names {used - names}, which /metrics does not expose"


def test_dashboard_queries_are_valid_promql(tmp_path):
    """promtool (Debian's prometheus package) parses each query as a recording rule would."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    queries = [query.replace("$__rate_interval", "5m") for query in dashboard_queries()]  # Grafana's variable
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query{i}", "expr": query} for i, query in enumerate(queries)]}]}
    (tmp_path / "rules.json").write_text(json.dumps(rules))  # YAML is a superset of JSON
    done = subprocess.run([promtool, "check", "rules", tmp_path / "rules.json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
