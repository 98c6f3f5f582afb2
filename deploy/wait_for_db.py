"""Wait until DATABASE_URL accepts connections, so start-up does not race the database's own start."""

import os
import sys
import time

from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool


def wait(url: str, timeout: float) -> bool:
    """Return True once a connection succeeds, False when timeout seconds pass first."""
    engine = create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 3})
    deadline = time.monotonic() + timeout
    while True:
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except OperationalError as exc:
            if time.monotonic() >= deadline:
                print(f"Database {engine.url.render_as_string(hide_password=True)} is not reachable: {exc.orig}", file=sys.stderr)
                return False
            time.sleep(1)


def main() -> int:
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith("postgresql"):
        return 0  # SQLite (the default) is a file: nothing to wait for
    timeout = float(os.environ.get("DB_WAIT_TIMEOUT") or 60)
    return 0 if wait(url, timeout) else 1


if __name__ == "__main__":
    sys.exit(main())
