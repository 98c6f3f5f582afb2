"""Tokens at rest: encrypted with the first key, readable with any, re-encrypted by rotate-token-keys."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy import event, text

import keys
import sessions
from conftest import make_config, sign_in, stored_user
from models import db

OLD_KEY = "8dPAA3qIkpHyELgsyIDmxI0ZBvP5jsC5Ys2yLAOFb3g="  # the one conftest's apps use
NEW_KEY = Fernet.generate_key().decode()
ROOT = Path(__file__).resolve().parent.parent


def raw_tokens(app) -> dict[str, str]:
    """Read the users table with plain SQL: what a database dump holds."""
    with app.app_context(), db.engine.connect() as conn:
        row = conn.execute(text("SELECT refresh_token, access_token, viewer_token FROM users")).mappings().one()
    return {name: value for name, value in row.items() if value is not None}


def dump(app) -> str:
    """Return every row of every table as text, plus the SQLite files' bytes."""
    with app.app_context(), db.engine.connect() as conn:
        text_dump = "\n".join(str(row) for table in db.metadata.sorted_tables for row in conn.execute(text(f"SELECT * FROM {table.name}")))  # noqa: S608 - table names from our metadata
        url = db.engine.url
    if url.get_backend_name() == "sqlite":
        for suffix in ("", "-wal"):
            path = Path(url.database + suffix)
            if path.exists():
                text_dump += path.read_bytes().decode("latin-1")
    return text_dump


def test_database_dump_holds_no_token_or_session_id(app, client):
    sign_in(client)
    client.get("/api/viewer-token")
    user = stored_user(app)
    secrets = [user.refresh_token, user.access_token, user.viewer_token]
    assert all(secrets)
    with app.test_request_context():
        session_id = sessions._signer().unsign(client.get_cookie("session").value).decode()
    everything = dump(app)
    for secret in [*secrets, session_id]:
        assert secret not in everything
    assert sessions.hash_id(session_id) in everything  # the table keeps only the hash
    # What is stored is Fernet ciphertext of the token under the configured key.
    stored = raw_tokens(app)
    assert Fernet(OLD_KEY).decrypt(stored["refresh_token"].encode()).decode() == user.refresh_token


def test_rotate_token_keys_re_encrypts_with_the_new_key(app_factory):
    first = app_factory(TOKEN_ENCRYPTION_KEYS=OLD_KEY)
    browser = first.test_client()
    sign_in(browser)
    viewer = browser.get("/api/viewer-token").get_json()["access_token"]
    before = stored_user(first)

    rotating = app_factory(TOKEN_ENCRYPTION_KEYS=f"{NEW_KEY},{OLD_KEY}")
    result = rotating.test_cli_runner().invoke(args=["rotate-token-keys"])
    assert result.exit_code == 0, result.output
    assert "stored tokens of 1 person" in result.output

    stored = raw_tokens(first)
    assert set(stored) == {"refresh_token", "access_token", "viewer_token"}
    for name, ciphertext in stored.items():
        assert Fernet(NEW_KEY).decrypt(ciphertext.encode()).decode() == getattr(before, name)
        with pytest.raises(InvalidToken):
            Fernet(OLD_KEY).decrypt(ciphertext.encode())

    # An instance that knows only the new key serves the same person on with the same cookie.
    retired = app_factory(TOKEN_ENCRYPTION_KEYS=NEW_KEY)
    later = retired.test_client()
    later.set_cookie("session", browser.get_cookie("session").value)
    assert later.get("/api/profile").get_json()["name"] == "Ada Lovelace"
    assert stored_user(retired).refresh_token == before.refresh_token
    # The viewer tokens kept for revocation were re-encrypted too: sign-out reads and revokes them.
    assert later.post("/auth/logout", data={"csrf_token": later.get("/api/session").get_json()["csrf_token"]}).status_code == 302
    assert retired.extensions["standin"].extensions["standin_store"].access_token(viewer) is None


def test_rotate_token_keys_reports_tokens_no_key_can_read(app_factory):
    first = app_factory(TOKEN_ENCRYPTION_KEYS=OLD_KEY)
    sign_in(first.test_client())
    before = raw_tokens(first)
    wrong = app_factory(TOKEN_ENCRYPTION_KEYS=NEW_KEY)
    result = wrong.test_cli_runner().invoke(args=["rotate-token-keys"])
    assert result.exit_code == 1
    assert "could not be decrypted" in result.output
    assert raw_tokens(first) == before  # left as they were, for when the right key is back


def test_rotate_token_keys_runs_from_the_flask_command(app_factory, tmp_path, database_url):
    app = app_factory(TOKEN_ENCRYPTION_KEYS=OLD_KEY)
    sign_in(app.test_client())
    before = stored_user(app)
    config = make_config(tmp_path, database_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OAUTH_", "APS_", "STANDIN_", "TOKEN_", "DATABASE_URL", "SECRET_KEY", "APP_ENV"))}
    env |= {
        "DATABASE_URL": database_url,
        "SECRET_KEY": "test-secret",
        "TOKEN_ENCRYPTION_KEYS": f"{NEW_KEY} {OLD_KEY}",
        "STANDIN_DATABASE_URL": config["STANDIN_DATABASE_URL"],
        "OAUTH_ISSUER": config["OAUTH_ISSUER"],
    }
    done = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "app", "rotate-token-keys"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert Fernet(NEW_KEY).decrypt(raw_tokens(app)["refresh_token"].encode()).decode() == before.refresh_token


def test_rotation_never_overwrites_a_token_stored_meanwhile(app_factory):
    """A refresh that stores a new token between the command's read and write wins."""
    first = app_factory(TOKEN_ENCRYPTION_KEYS=OLD_KEY)
    sign_in(first.test_client())
    rotating = app_factory(TOKEN_ENCRYPTION_KEYS=f"{NEW_KEY},{OLD_KEY}")
    meanwhile = Fernet(NEW_KEY).encrypt(b"refresh-token-stored-meanwhile").decode()
    fired = []

    def refresh_meanwhile(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("UPDATE USERS") and not fired:
            fired.append(statement)
            with db.engine.connect() as other:  # another connection, as another process's refresh
                other.execute(text("UPDATE users SET refresh_token = :token"), {"token": meanwhile})
                other.commit()

    with rotating.app_context():
        event.listen(db.engine, "before_cursor_execute", refresh_meanwhile)
        try:
            assert keys.rotate_all() == (1, 0)
        finally:
            event.remove(db.engine, "before_cursor_execute", refresh_meanwhile)
    assert fired
    assert raw_tokens(first)["refresh_token"] == meanwhile
