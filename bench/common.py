"""What every benchmark shares: databases, gunicorn servers, a light HTTP load client, log parsing."""

import asyncio
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import requests
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("BENCH_RESULTS", ROOT / "bench" / "results"))
# The app's modules and the tests' gunicorn harness (servers.py) are imported, not copied.
for folder in (ROOT, ROOT / "tests"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from servers import Gunicorn, free_port, http_sign_in, migrate, server_env  # noqa: E402

__all__ = ["Gunicorn", "free_port", "http_sign_in", "migrate", "server_env"]

PG_ADMIN = os.environ.get("BENCH_POSTGRES_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")


def machine() -> dict:
    """Describe the machine the numbers come from."""
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    mem_kb = int(re.search(r"^MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text(), re.M)[1])
    with psycopg.connect(PG_ADMIN) as conn:
        pg = conn.execute("SHOW server_version").fetchone()[0]
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model[1].strip() if model else platform.processor(),
        "ram_gib": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "postgresql": pg,
        "load_1min_at_start": os.getloadavg()[0],
    }


@contextmanager
def postgres_database(prefix: str = "bench") -> Iterator[str]:
    """Create a fresh PostgreSQL database, yield its SQLAlchemy URL, and drop it afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@contextmanager
def database(kind: str, workdir: Path, prefix: str = "bench") -> Iterator[str]:
    """Yield a fresh, empty database URL of the kind "sqlite" or "postgresql"."""
    if kind == "sqlite":
        path = workdir / f"{prefix}-{uuid.uuid4().hex[:6]}.sqlite"
        yield f"sqlite:///{path}"
        return
    with postgres_database(prefix) as url:
        yield url


def workdir(name: str) -> Path:
    """Return a new folder under bench/results for one benchmark's logs and files."""
    path = RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def bench_env(folder: Path, database_url: str, issuer_port: int, **extra: str) -> dict:
    """Return the app's environment for a benchmark (the tests' settings, sign-in rate limit off), migrated."""
    folder.mkdir(parents=True, exist_ok=True)
    env = server_env(folder, database_url, f"http://127.0.0.1:{issuer_port}/standin", SIGNIN_RATE_LIMIT="off", **extra)
    migrate(env)
    return env


def start_server(
    env: dict, port: int, log_path: Path, workers: int = 3, threads: int = 4, tree: Path | None = None, target: str = "app:create_app()"
) -> Gunicorn:
    """Start a gunicorn instance; on a loaded machine keep waiting for a slow first answer, and never leak it.

    tree: serve the app from this copy of the code (a patched one) instead of the working tree.
    target: the WSGI app gunicorn serves (a peer's, bench/peers/).
    """
    server = Gunicorn(env, port, log_path, workers=workers, threads=threads, target=target)
    if tree is not None:
        server.args += ["--chdir", str(tree)]
    try:
        server.start()
        if tree is not None:
            assert all(Path(f"/proc/{pid}/cwd").resolve() == tree.resolve() for pid in server.workers()), "workers run another tree"
        return server
    except requests.RequestException:
        # servers.py waits 1 s per health check and gives up on a read timeout; workers still booting are slow.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{server.url}/healthz", timeout=5).status_code == 200:
                    return server
            except requests.RequestException:
                time.sleep(0.5)
        server.stop()
        raise
    except BaseException:
        server.stop()
        raise


@contextmanager
def patched_tree(patches: list[str]) -> Iterator[Path]:
    """Yield a temporary copy of the working tree with the patches (unified diffs) applied."""
    with tempfile.TemporaryDirectory(prefix="bench-patched-") as tmp:
        copy = Path(tmp) / "app"
        skip = shutil.ignore_patterns(".venv", ".git", "results", "instance", "__pycache__", ".pytest_cache", ".ruff_cache", "test-output", "node_modules")
        shutil.copytree(ROOT, copy, ignore=skip)
        (copy / ".venv").symlink_to(ROOT / ".venv")
        for patch in patches:
            subprocess.run(["patch", "-p1", "--quiet", "-i", str(Path(patch).resolve())], cwd=copy, check=True)
        yield copy


def cookie_header(browser) -> str:
    """Return the Cookie header value a signed-in requests.Session sends."""
    return "; ".join(f"{k}={v}" for k, v in browser.cookies.get_dict().items() if k == "session")


def percentile(values: list[float], pct: float) -> float:
    """Return the pct-th percentile (nearest rank) of values; nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def refresh_log(paths: list[Path], since: float = 0.0) -> list[dict]:
    """Read the token_refresh JSON lines the servers logged, with the time each was written."""
    events = []
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            start = line.find('{"event": "token_refresh"')
            if start < 0:
                continue
            event = json.loads(line[start:])
            stamp = line[:23]
            try:
                event["logged_at"] = time.mktime(time.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S")) + int(stamp[20:23]) / 1000
            except ValueError:
                event["logged_at"] = 0.0
            if event["logged_at"] >= since:
                events.append(event)
    return events


async def _one(host: str, port: int, path: str, cookie: str, start: asyncio.Event | None, opened: list) -> tuple[int | str, float]:
    """Send one GET on its own connection and return (status or error name, seconds from send to full reply)."""
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        return type(exc).__name__, 0.0
    opened.append(1)
    try:
        if start is not None:
            await start.wait()
        request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nCookie: {cookie}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
        sent = time.perf_counter()
        writer.write(request.encode())
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(), timeout=120)
        took = time.perf_counter() - sent
        status_line = reply.split(b"\r\n", 1)[0].split()
        return (int(status_line[1]) if len(status_line) > 1 else "EmptyReply"), took
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        return type(exc).__name__, time.perf_counter() - sent if "sent" in locals() else 0.0
    finally:
        writer.close()


def fire(targets: list[tuple[str, int, str, str]], together: bool = True) -> list[tuple[int | str, float]]:
    """Send one request per (host, port, path, cookie), all at once; return (status, latency) in order.

    together: open every connection first, then send all requests in the same instant, so they
    arrive at the servers as one burst rather than trickling in while connections open.
    """

    async def main():
        start = asyncio.Event() if together else None
        opened: list = []
        tasks = [asyncio.create_task(_one(*target, start, opened)) for target in targets]
        if start is not None:
            deadline = time.monotonic() + 30
            while len(opened) < len(targets) and time.monotonic() < deadline and not all(t.done() for t in tasks):
                await asyncio.sleep(0.005)
            start.set()
        return await asyncio.gather(*tasks)

    return asyncio.run(main())


def wait_for_load(limit: float = 1.5, give_up_at: float | None = None) -> float:
    """Wait until the 1-minute load average drops below limit (or until give_up_at); return it."""
    while os.getloadavg()[0] >= limit and (give_up_at is None or time.time() < give_up_at):
        time.sleep(10)
    return os.getloadavg()[0]
