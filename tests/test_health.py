"""Liveness and readiness: /healthz never needs the database, /readyz says what keeps this process from serving."""

import pytest
from sqlalchemy import text

import health
from app import create_app
from conftest import close_databases, make_config
from models import db
from servers import free_port


def test_ready_when_the_database_answers_at_the_migration_head(app, client):
    reply = client.get("/readyz")
    assert reply.status_code == 200 and reply.get_json() == {"status": "ready"}
    assert reply.headers["Cache-Control"] == "no-store"


def test_migrations_pending_are_not_ready(app, client):
    """A replica whose code is newer than the schema must not get traffic before `db upgrade` ran."""
    with app.app_context():
        db.session.execute(text("UPDATE alembic_version SET version_num = 'cbb9c852c206'"))  # the first migration
        db.session.commit()
    reply = client.get("/readyz")
    assert reply.status_code == 503
    assert reply.get_json()["reason"] == "migrations_pending"
    assert "flask --app app db upgrade" in reply.get_json()["message"]
    assert client.get("/healthz").status_code == 200  # alive all the same: restarting it would not help


def test_an_empty_database_is_not_ready(tmp_path, database_url):
    if database_url.startswith("postgresql"):
        with create_app(make_config(tmp_path, database_url)).app_context() as context:
            with db.engine.begin() as conn:
                conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
            close_databases(context.app)
    else:
        database_url = f"sqlite:///{tmp_path / 'empty.sqlite'}"
    app = create_app(make_config(tmp_path, database_url))
    reply = app.test_client().get("/readyz")
    assert reply.status_code == 503 and reply.get_json()["reason"] == "migrations_pending"
    close_databases(app)


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
def test_an_unreachable_database_is_not_ready_but_alive(tmp_path, database_url):
    if database_url.startswith("postgresql"):
        unreachable = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/signin"  # nothing listens there
    else:
        unreachable = f"sqlite:///{tmp_path / 'instance' / 'gone'}/app.sqlite"  # its folder does not exist
    app = create_app(make_config(tmp_path, unreachable))
    client = app.test_client()
    reply = client.get("/readyz")
    assert reply.status_code == 503
    assert reply.get_json() == {"status": "not_ready", "reason": "database_unreachable", "message": "The database does not answer."}
    assert client.get("/healthz").get_json() == {"status": "ok"}
    close_databases(app)


def test_not_ready_while_stopping(app, client):
    health.stopping.set()
    try:
        reply = client.get("/readyz")
    finally:
        health.stopping.clear()
    assert reply.status_code == 503 and reply.get_json()["reason"] == "shutting_down"
    assert client.get("/readyz").status_code == 200


def test_readiness_skips_the_sign_in_hook(app, client):
    """A probe carries no cookie worth reading; a forged one must not make it do session work."""
    client.set_cookie("session", "forged")
    reply = client.get("/readyz")
    assert reply.status_code == 200
    assert "Set-Cookie" not in reply.headers
