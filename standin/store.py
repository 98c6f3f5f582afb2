"""The stand-in provider's own storage: codes, tokens, people, counters and injected faults."""

import contextlib
import hashlib
import os
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    update,
)

metadata = MetaData()

people = Table(
    "people",
    metadata,
    Column("sub", String(64), primary_key=True),
    Column("name", String(255), nullable=False),
    Column("email", String(255), nullable=False),
)

codes = Table(
    "codes",
    metadata,
    Column("code_hash", String(64), primary_key=True),
    Column("client_id", String(255), nullable=False),
    Column("redirect_uri", String(2048), nullable=False),
    Column("code_challenge", String(128), nullable=False),
    Column("scope", String(1024), nullable=False),
    Column("sub", String(64), nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("used", Boolean, nullable=False, default=False),
)

# status: active (usable once), used (rotated away), revoked (replaced by a sign-in, or revoked).
refresh_tokens = Table(
    "refresh_tokens",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("client_id", String(255), nullable=False),
    Column("sub", String(64), nullable=False, index=True),
    Column("scope", String(1024), nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("status", String(16), nullable=False),
)

access_tokens = Table(
    "access_tokens",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("client_id", String(255), nullable=False),
    Column("sub", String(64), nullable=False),
    Column("scope", String(1024), nullable=False),
    Column("expires_at", Float, nullable=False),
)

# Browsers signed in at the provider itself, so authorize with prompt=none can answer without a form.
browser_sessions = Table(
    "browser_sessions",
    metadata,
    Column("id_hash", String(64), primary_key=True),
    Column("sub", String(64), nullable=False),
    Column("expires_at", Float, nullable=False),
)

# What happened at the token endpoint, so tests and benchmarks can count refreshes.
events = Table(
    "events",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("kind", String(32), nullable=False, index=True),
    Column("sub", String(64), nullable=False, default=""),
    Column("at", Float, nullable=False),
)

# Faults to inject into the next token requests: 5xx, invalid_grant, timeout (slow, then done),
# hang (slow, then nothing done) and drop (done, then the reply is lost); api_* ones into the next API calls.
faults = Table(
    "faults",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("remaining", Integer, nullable=False),
    Column("delay", Float, nullable=False, default=0.0),
    # The process that took the fault last, so a test can kill the worker stuck in it.
    Column("taken_by", Integer, nullable=True),
)

TOKEN_FAULTS = {"5xx", "timeout", "hang", "drop", "invalid_grant"}
# Faults of the Data Management API (standin/data.py): a 503, a slow answer (delay), an oversized one (delay = MiB), a 401 to any token.
API_FAULTS = {"api_5xx", "api_slow", "api_large", "api_401"}
FAULT_KINDS = TOKEN_FAULTS | API_FAULTS


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


class Store:
    """Persist the stand-in's state in its own database, shared by every process that serves it."""

    def __init__(self, url: str):
        connect_args = {"timeout": 30, "check_same_thread": False} if url.startswith("sqlite") else {}
        self.engine = create_engine(url, connect_args=connect_args, hide_parameters=True)
        if url.startswith("sqlite"):
            private_sqlite_file(self.engine.url.database)
            event.listen(self.engine, "connect", _sqlite_wal)
        metadata.create_all(self.engine)

    @contextmanager
    def transaction(self) -> Iterator:
        """Open a write transaction; on SQLite take the write lock up front so it cannot fail midway."""
        with self.engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.rollback()
                raise
            conn.commit()

    def add_person(self, name: str) -> dict:
        """Return the person called name, creating them with a subject derived from the name."""
        name = " ".join(name.split())[:100]
        sub = digest(name.lower())[:24]
        email = "".join(c for c in name.lower() if c.isalnum() or c in ".-_") or "person"
        person = {"sub": sub, "name": name, "email": f"{email}@standin.example"}
        with self.transaction() as conn:
            if conn.execute(select(people.c.sub).where(people.c.sub == sub)).first() is None:
                conn.execute(insert(people).values(**person))
        return person

    def start_browser_session(self, sub: str, ttl: float) -> str:
        """Remember that this browser signed in as sub; return the cookie value."""
        session_id = new_token()
        with self.transaction() as conn:
            conn.execute(insert(browser_sessions).values(id_hash=digest(session_id), sub=sub, expires_at=time.time() + ttl))
        return session_id

    def browser_session(self, session_id: str) -> str | None:
        """Return the subject signed in with this cookie value, if the session is still alive."""
        query = select(browser_sessions.c.sub).where(browser_sessions.c.id_hash == digest(session_id), browser_sessions.c.expires_at > time.time())
        with self.engine.connect() as conn:
            return conn.execute(query).scalar()

    def end_browser_session(self, session_id: str) -> None:
        with self.transaction() as conn:
            conn.execute(delete(browser_sessions).where(browser_sessions.c.id_hash == digest(session_id)))

    def person(self, sub: str) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(people).where(people.c.sub == sub)).mappings().first()
        return dict(row) if row else None

    def add_code(self, *, client_id: str, redirect_uri: str, code_challenge: str, scope: str, sub: str) -> str:
        code = new_token()
        with self.transaction() as conn:
            conn.execute(
                insert(codes).values(
                    code_hash=digest(code),
                    client_id=client_id,
                    redirect_uri=redirect_uri,
                    code_challenge=code_challenge,
                    scope=scope,
                    sub=sub,
                    expires_at=time.time() + 300,
                    used=False,
                )
            )
        return code

    def take_code(self, code: str) -> dict | None:
        """Return the code's grant and mark it used; None if unknown, used or expired."""
        with self.transaction() as conn:
            taken = conn.execute(update(codes).where(codes.c.code_hash == digest(code), codes.c.used.is_(False)).values(used=True)).rowcount
            row = conn.execute(select(codes).where(codes.c.code_hash == digest(code))).mappings().first()
        if not taken or row is None or row["expires_at"] < time.time():
            return None
        return dict(row)

    def issue(self, conn, *, client_id: str, sub: str, scope: str, access_scope: str, access_ttl: int, refresh_ttl: int) -> dict:
        """Issue an access token and a refresh token within the caller's transaction."""
        access, refresh = new_token(), new_token()
        now = time.time()
        conn.execute(insert(access_tokens).values(token_hash=digest(access), client_id=client_id, sub=sub, scope=access_scope, expires_at=now + access_ttl))
        conn.execute(
            insert(refresh_tokens).values(token_hash=digest(refresh), client_id=client_id, sub=sub, scope=scope, expires_at=now + refresh_ttl, status="active")
        )
        return {"access_token": access, "token_type": "Bearer", "expires_in": access_ttl, "refresh_token": refresh, "scope": access_scope}

    def revoke_grant(self, conn, client_id: str, sub: str) -> None:
        """Revoke the person's active refresh tokens for this client (one per person per app)."""
        conn.execute(
            update(refresh_tokens)
            .where(refresh_tokens.c.client_id == client_id, refresh_tokens.c.sub == sub, refresh_tokens.c.status == "active")
            .values(status="revoked")
        )

    def record(self, conn, kind: str, sub: str = "") -> None:
        conn.execute(insert(events).values(kind=kind, sub=sub, at=time.time()))

    def count(self, kind: str, sub: str | None = None) -> int:
        """Count recorded events of a kind (refresh, refresh_rejected, code), for tests and benchmarks."""
        query = select(func.count()).select_from(events).where(events.c.kind == kind)
        if sub is not None:
            query = query.where(events.c.sub == sub)
        with self.engine.connect() as conn:
            return conn.execute(query).scalar_one()

    def access_token(self, token: str) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(access_tokens).where(access_tokens.c.token_hash == digest(token))).mappings().first()
        if row is None or row["expires_at"] < time.time():
            return None
        return dict(row)

    def refresh_token(self, token: str) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(refresh_tokens).where(refresh_tokens.c.token_hash == digest(token))).mappings().first()
        return dict(row) if row else None

    def inject(self, kind: str, count: int = 1, delay: float = 0.0) -> None:
        """Make the next count token requests fail in the given way."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}")
        with self.transaction() as conn:
            conn.execute(insert(faults).values(kind=kind, remaining=count, delay=delay))

    def fault_takers(self) -> list[int]:
        """Return the process ids that took an injected fault."""
        with self.engine.connect() as conn:
            return [pid for (pid,) in conn.execute(select(faults.c.taken_by).where(faults.c.taken_by.is_not(None)))]

    def clear_faults(self) -> None:
        with self.transaction() as conn:
            conn.execute(delete(faults))

    def take_fault(self, kinds: set[str] = TOKEN_FAULTS) -> dict | None:
        """Consume one injected fault of these kinds, if any is pending."""
        pending = select(faults).where(faults.c.remaining > 0, faults.c.kind.in_(sorted(kinds))).order_by(faults.c.id)
        with self.transaction() as conn:  # a write transaction: two processes never take the same last fault
            row = conn.execute(pending.with_for_update()).mappings().first()
            if row is None:
                return None
            conn.execute(update(faults).where(faults.c.id == row["id"]).values(remaining=faults.c.remaining - 1, taken_by=os.getpid()))
        return dict(row)


def private_sqlite_file(path: str | None) -> None:
    """Create a SQLite database file readable by its owner only, before SQLite creates it with the umask's mode.

    SQLite gives the -wal and -shm files the database file's mode, so they stay private too.
    """
    if not path or path == ":memory:" or path.startswith("file:"):
        return
    # An existing database keeps its mode; a missing folder is SQLite's error to report.
    with contextlib.suppress(FileExistsError, FileNotFoundError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _sqlite_wal(dbapi_connection, _record) -> None:
    # WAL lets readers go on while a writer holds the lock.
    dbapi_connection.execute("PRAGMA journal_mode=WAL")
