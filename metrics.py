"""Prometheus metrics of the token lifecycle, counted over every gunicorn worker and served at GET /metrics.

Under gunicorn, gunicorn.conf.py sets PROMETHEUS_MULTIPROC_DIR before any worker starts: each worker
writes its counts to files there, and a scrape, answered by any one worker, adds them all up. Without
it (the flask dev server, the tests) the counts live in this process.
"""

import ipaddress
import os
from collections.abc import Iterator

from flask import Blueprint, Response, abort, current_app, request
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy import func, select

from models import UserSession, db, utcnow

bp = Blueprint("metrics", __name__)

# A *_created series per label set doubles what a scrape carries and says nothing an operator asks.
disable_created_metrics()

# A refresh waits 100-500 ms for the provider, and up to PROVIDER_REFRESH_TIMEOUT (30 s) when it hangs.
REFRESH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# A waiter waits for the refresher's provider call, or not at all when the refresh had just ended.
WAIT_BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

REFRESHES = Counter("signin_token_refreshes", "Refresh attempts by token kind and outcome.", ["kind", "outcome"])
REFRESH_SECONDS = Histogram("signin_token_refresh_seconds", "The refresher's whole refresh, provider included.", buckets=REFRESH_BUCKETS)
WAIT_SECONDS = Histogram("signin_refresh_wait_seconds", "How long requests waited for another request's refresh.", buckets=WAIT_BUCKETS)
SIGN_INS = Counter("signin_sign_ins", "Sign-ins completed, interactive or silent (prompt=none).", ["how"])
SIGN_OUTS = Counter("signin_sign_outs", "Sign-outs: one device, everywhere, or by the provider's back-channel logout.", ["how"])
PROXY_REQUESTS = Counter("signin_proxy_requests", "Requests to the API proxy (/api/aps/) by the status answered.", ["status"])

# Known label values start at zero, so a rate() over them is defined before the first event.
for _kind in ("access", "viewer"):
    REFRESHES.labels(_kind, "refreshed")
for _how in ("interactive", "silent"):
    SIGN_INS.labels(_how)
for _how in ("device", "everywhere", "backchannel"):
    SIGN_OUTS.labels(_how)


def count_refresh(kind: str, outcome: str, seconds: float | None) -> None:
    """Count one refresh attempt's outcome; seconds, when given, is the refresher's whole refresh."""
    REFRESHES.labels(kind, outcome).inc()
    if seconds is not None:
        REFRESH_SECONDS.observe(seconds)


def observe_wait(seconds: float) -> None:
    """Record how long a request waited for another request's refresh."""
    WAIT_SECONDS.observe(seconds)


def count_sign_in(how: str) -> None:
    """Count a completed sign-in: interactive or silent."""
    SIGN_INS.labels(how).inc()


def count_sign_out(how: str) -> None:
    """Count a sign-out: device, everywhere or backchannel."""
    SIGN_OUTS.labels(how).inc()


def count_proxy(status: int) -> None:
    """Count a request to the API proxy by the status it was answered with."""
    PROXY_REQUESTS.labels(str(status)).inc()


def count_proxy_response(response: Response) -> Response:
    """Count a proxy answer, whichever way it came about (the API host's, a refusal, an error page)."""
    count_proxy(response.status_code)
    return response


@bp.get("/metrics")
def metrics() -> Response:
    """Answer the Prometheus text format to the loopback and METRICS_ALLOW; to anyone else, there is nothing here."""
    if not _allowed(request.remote_addr or ""):
        abort(404)
    return Response(generate_latest(_Scrape(_live_sessions())), content_type=CONTENT_TYPE_LATEST)


def _allowed(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    ip = getattr(ip, "ipv4_mapped", None) or ip  # ::ffff:127.0.0.1 from a dual-stack socket
    return ip.is_loopback or any(ip in network for network in current_app.config["METRICS_ALLOW"])


def _live_sessions() -> int:
    """Count live sessions once per scrape (expires_at is indexed), rather than keep a gauge up to date on every request."""
    return db.session.execute(select(func.count()).select_from(UserSession).where(UserSession.expires_at > utcnow())).scalar_one()


class _Scrape:
    """What one scrape reports: every worker's counts (or this process's), and the live sessions counted now."""

    def __init__(self, live: int):
        self.live = live

    def collect(self) -> Iterator[Metric]:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            yield from MultiProcessCollector(None).collect()
        else:
            yield from REGISTRY.collect()
        yield GaugeMetricFamily("signin_sessions_live", "Sessions not yet ended, over every browser and device.", value=self.live)
