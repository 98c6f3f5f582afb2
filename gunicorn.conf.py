"""gunicorn settings shared by the image's entrypoint, the demo, the compose stand-in and the tests.

    gunicorn --config gunicorn.conf.py 'app:create_app()'

Options on the command line (and GUNICORN_CMD_ARGS) take precedence over these.
"""

import glob
import os
import shutil
import signal
import tempfile
from urllib.parse import quote

from gunicorn.glogging import Logger

# The path without its query string (the callback's query carries the provider's one-time code).
access_log_format = '%(h)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(M)sms'

# ProxyFix (TRUSTED_PROXY_COUNT) is the one place that believes X-Forwarded-*: gunicorn's own
# default trusts them from 127.0.0.1, so any local client could make the redirect URI https.
forwarded_allow_ips = ""

# Characters a path may carry as they are; everything else (%, spaces, quotes, control characters,
# non-ASCII) is written percent-encoded.
PATH_SAFE = "/:@!$&'()*+,;=-._~"


class PathEscapingLogger(Logger):
    """Write the request path percent-encoded, so a %0a in a URL cannot start a forged log line."""

    def atoms(self, resp, req, environ, request_time):
        atoms = super().atoms(resp, req, environ, request_time)
        # WSGI hands the decoded path over as Latin-1 text; its bytes are what the client sent.
        atoms["U"] = quote((environ.get("PATH_INFO") or "").encode("latin-1", "replace"), safe=PATH_SAFE)
        return atoms


logger_class = PathEscapingLogger


def json_logs() -> dict:
    """Return logconfig_dict for LOG_FORMAT=json: gunicorn's messages, the access log and the app's all as JSON lines."""
    # Imported here: a module-level name of this file is read as a gunicorn setting ("config" is one).
    import config
    import logs

    try:
        wanted = config.log_format(os.environ)
    except config.ConfigError:
        return {}  # on_starting stops gunicorn with the sentence
    return logs.gunicorn_logconfig() if wanted == "json" else {}


logconfig_dict = json_logs()


def fresh_metrics_dir() -> None:
    """Give prometheus_client's multiprocess mode an empty directory, before anything imports it.

    PROMETHEUS_MULTIPROC_DIR, when set, is emptied of the counts of earlier runs (which would be added
    to this run's); unset, a new directory is made for this master and removed when it exits.
    """
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        os.makedirs(path, exist_ok=True)
        for stale in glob.glob(os.path.join(path, "*.db")):
            os.remove(stale)
    else:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.environ["SIGNIN_METRICS_DIR_MADE"] = tempfile.mkdtemp(prefix="signin-metrics-")


def child_exit(server, worker) -> None:
    """Tell prometheus_client a worker died, so its per-process gauges stop being reported."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server) -> None:
    """Remove the metrics directory this master made."""
    made = os.environ.get("SIGNIN_METRICS_DIR_MADE")
    if made:
        shutil.rmtree(made, ignore_errors=True)


# --- Stops: a refresh in flight when the instance is told to stop still stores its rotation. -------------


def _seconds(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else default  # a bad value stops start-up in on_starting


def refresh_budget() -> int:
    """Seconds a refresh already sent may still need: its reply, an introspection after a lost one, the store's retries."""
    return _seconds("PROVIDER_REFRESH_TIMEOUT", 30) + _seconds("PROVIDER_TIMEOUT", 10) + _seconds("ROTATION_STORE_RETRY", 10)


# SIGTERM (docker stop, Kubernetes, systemd) lets requests in flight finish for this long before the
# workers are killed: a refresh cut off after the provider rotated would be a sign-in lost.
graceful_timeout = refresh_budget() + 5


def _is_the_app(arbiter_or_worker) -> bool:
    return (getattr(arbiter_or_worker.app, "app_uri", None) or "").split(":")[0] == "app"


def post_worker_init(worker) -> None:
    """Make /readyz answer 503 from the moment this worker starts its graceful stop (SIGTERM)."""
    if not _is_the_app(worker):
        return
    import health

    graceful = worker.handle_exit

    def stop(signum, frame) -> None:
        health.stopping.set()
        graceful(signum, frame)

    signal.signal(signal.SIGTERM, stop)


def on_starting(server) -> None:
    """Check the app's settings once, in the master, before any worker starts.

    A worker that fails to load the app exits with code 1, which gunicorn answers by starting another,
    for ever: a missing SECRET_KEY would never stop. Refused here, gunicorn exits at once with the sentence.
    """
    import config

    fresh_metrics_dir()
    if not _is_the_app(server):
        return  # another app under the same settings (the compose stand-in)
    from app import load_config

    try:
        settings = load_config()
    except config.ConfigError as exc:
        raise SystemExit(f"Configuration error: {exc}") from None
    budget = settings["PROVIDER_REFRESH_TIMEOUT"] + settings["PROVIDER_TIMEOUT"] + settings["ROTATION_STORE_RETRY"]
    # Production only: the demo stops within seconds on Ctrl-C, its stand-in answering refreshes in-process.
    if settings["APP_ENV"] == "production" and server.cfg.graceful_timeout <= budget:
        raise SystemExit(
            f"Configuration error: gunicorn's graceful timeout ({server.cfg.graceful_timeout} s) must be longer than a refresh may take "
            f"({budget} s: PROVIDER_REFRESH_TIMEOUT + PROVIDER_TIMEOUT + ROTATION_STORE_RETRY); leave --graceful-timeout unset."
        )
