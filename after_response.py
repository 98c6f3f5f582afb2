"""Work a request leaves for after its response: a small pool of threads per worker process.

A refresh ahead of expiry (tokens.refresh_ahead) runs here, so no request waits for the
provider. The work starts once the response has been sent (Werkzeug's call_on_close), in the
app's context, on one of POOL_THREADS threads; one job per key (a person) at a time in this
process, at most MAX_PENDING waiting. A graceful stop finishes it: the pool's threads are
joined when the worker's interpreter exits.
"""

import json
import logging
import os
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor

from flask import Flask, Response, after_this_request, current_app, has_request_context

log = logging.getLogger("tokens")

# A worker never spends more than this many threads on work after its responses.
POOL_THREADS = 2
# More than this many jobs waiting in one worker: skip; a later request asks again, or refreshes in line.
MAX_PENDING = 100

_lock = threading.Condition()
_pending: set[Hashable] = set()
_pool: ThreadPoolExecutor | None = None
_pool_pid = 0  # a pool made before a fork has no threads in the child


def run(key: Hashable, job: Callable[..., object], *args: object) -> None:
    """Run job(*args) in the app's context once this request's response has been sent, unless a job for key is already pending here."""
    app = current_app._get_current_object()
    if not has_request_context():
        _submit(app, key, job, args)
        return

    @after_this_request
    def start_when_sent(response: Response) -> Response:
        response.call_on_close(lambda: _submit(app, key, job, args))
        return response


def _submit(app: Flask, key: Hashable, job: Callable[..., object], args: tuple) -> None:
    global _pool, _pool_pid
    with _lock:
        if key in _pending or len(_pending) >= MAX_PENDING:
            return
        if _pool is None or _pool_pid != os.getpid():
            _pool, _pool_pid = ThreadPoolExecutor(POOL_THREADS, thread_name_prefix="after-response"), os.getpid()
        _pending.add(key)
        try:
            _pool.submit(_run, app, key, job, args)
        except RuntimeError:
            _pending.discard(key)  # the interpreter is shutting down: the next in-line refresh does it


def _run(app: Flask, key: Hashable, job: Callable[..., object], args: tuple) -> None:
    try:
        with app.app_context():
            job(*args)
    except Exception as exc:  # the job recorded its outcome as an event; this thread lives on for the next
        log.info(json.dumps({"event": "after_response_failed", "job": getattr(job, "__name__", "job"), "reason": type(exc).__name__}))
    finally:
        with _lock:
            _pending.discard(key)
            _lock.notify_all()


def wait_idle(timeout: float) -> bool:
    """Wait until this process has no job pending or running; False if some still are after timeout seconds."""
    with _lock:
        return _lock.wait_for(lambda: not _pending, timeout)
