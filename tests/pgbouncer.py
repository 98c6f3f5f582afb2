"""A PgBouncer of a test's own (Debian's package) in transaction mode, in front of a PostgreSQL server.

Transaction mode as operators run it, with nothing that would make it easier for the app: no
`ignore_startup_parameters`, so a startup `options` is refused, and each transaction may run on
another server connection, so a prepared statement or a session setting does not follow the next one.
"""

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from servers import free_port

PGBOUNCER = "/usr/sbin/pgbouncer"


class PgBouncer:
    """pgbouncer on 127.0.0.1 and a free port, forwarding every database to the server at `upstream`."""

    def __init__(self, upstream: str = "127.0.0.1:5432", pool_size: int = 20, max_client_conn: int = 1000):
        self.port = free_port()
        host, _, port = upstream.partition(":")
        self.folder = Path(tempfile.mkdtemp(prefix="own-pgbouncer-"))
        # The fallback database `*` forwards any database name to the same name upstream.
        (self.folder / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={host} port={port}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {self.folder / 'users.txt'}\nadmin_users = postgres\nstats_users = postgres\n"
            f"pool_mode = transaction\ndefault_pool_size = {pool_size}\nmax_client_conn = {max_client_conn}\n"
            f"logfile = {self.folder / 'pgbouncer.log'}\npidfile = {self.folder / 'pgbouncer.pid'}\n"
        )
        (self.folder / "users.txt").write_text('"postgres" ""\n')
        # pgbouncer refuses to run as root: as the postgres user, who owns the folder.
        self.prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.prefix:
            entry = pwd.getpwnam("postgres")
            for path in (self.folder, *self.folder.iterdir()):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self.process: subprocess.Popen | None = None

    def start(self) -> "PgBouncer":
        self.process = subprocess.Popen([*self.prefix, PGBOUNCER, str(self.folder / "pgbouncer.ini")], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log()
            with contextlib.suppress(psycopg.OperationalError):
                psycopg.connect(self.admin_url, autocommit=True, connect_timeout=2).close()
                return self
            time.sleep(0.1)
        raise RuntimeError(f"pgbouncer did not start: {self.log()}")

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/pgbouncer"

    def url_for(self, database_url: str) -> str:
        """The same database reached through this pooler."""
        parts = urlsplit(database_url)
        return urlunsplit(parts._replace(netloc=f"{parts.username or 'postgres'}@127.0.0.1:{self.port}"))

    def show(self, what: str) -> list[dict]:
        """Rows of the admin console's SHOW <what> (POOLS, SERVERS, STATS)."""
        # The admin console speaks the simple query protocol only.
        with psycopg.connect(self.admin_url, autocommit=True, prepare_threshold=None) as conn:
            cursor = conn.cursor()
            cursor.execute(f"SHOW {what}", prepare=False)
            names = [column.name for column in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def log(self) -> str:
        path = self.folder / "pgbouncer.log"
        return path.read_text()[-3000:] if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            # pgbouncer runs under runuser: signal the pooler itself, whose pid it wrote.
            with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
                os.kill(int((self.folder / "pgbouncer.pid").read_text()), 15)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.contextmanager
def pgbouncer(**options) -> Iterator[PgBouncer]:
    """Run a PgBouncer for the duration of the block."""
    pooler = PgBouncer(**options).start()
    try:
        yield pooler
    finally:
        pooler.stop()


@pytest.fixture(scope="session")
def pgbouncer_server() -> Iterator[PgBouncer]:
    """One PgBouncer for the test run, in front of the shared PostgreSQL."""
    if not Path(PGBOUNCER).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{PGBOUNCER} is missing; .ci/run installs Debian's pgbouncer")
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer)")
    with pgbouncer() as pooler:
        yield pooler


@pytest.fixture
def pooler(request) -> PgBouncer | None:
    """The PgBouncer a test's servers reach PostgreSQL through (parametrized "pgbouncer"), or None: directly."""
    if getattr(request, "param", None) != "pgbouncer":
        return None
    return request.getfixturevalue("pgbouncer_server")


# The process tests on SQLite, on PostgreSQL, and on PostgreSQL behind PgBouncer in transaction mode.
EVERY_DATABASE = pytest.mark.parametrize(
    ("database_url", "pooler"), [("sqlite", None), ("postgresql", None), ("postgresql", "pgbouncer")], indirect=True, ids=["sqlite", "postgresql", "pgbouncer"]
)
POSTGRESQL_AND_PGBOUNCER = pytest.mark.parametrize(
    ("database_url", "pooler"), [("postgresql", None), ("postgresql", "pgbouncer")], indirect=True, ids=["postgresql", "pgbouncer"]
)


@pytest.fixture
def pgbouncer_app_factory(app_factory, database_url, pgbouncer_server):
    """app_factory's apps, reaching this test's PostgreSQL database through PgBouncer."""
    return lambda **overrides: app_factory(SQLALCHEMY_DATABASE_URI=pgbouncer_server.url_for(database_url), **overrides)


ON_POSTGRESQL = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
