"""Behind a transaction-mode pooler with no setting of the app's own; prepared statements only when asked for."""

import sqlalchemy

from conftest import expire_access_token, sign_in
from models import User, db
from pgbouncer import ON_POSTGRESQL, pgbouncer_app_factory, pgbouncer_server  # noqa: F401 (fixtures used by name)


def _prepared_after_repeats(app) -> int:
    with app.app_context(), db.engine.connect() as conn:
        for _ in range(10):  # psycopg prepares a statement on its fifth execution on a connection
            conn.execute(sqlalchemy.select(User.id).where(User.id == 1)).all()
        count = conn.exec_driver_sql("SELECT count(*) FROM pg_prepared_statements").scalar()
        conn.rollback()
        return count


@ON_POSTGRESQL
def test_prepared_statements_are_an_opt_in_for_a_direct_connection(app_factory):
    assert _prepared_after_repeats(app_factory()) == 0
    assert _prepared_after_repeats(app_factory(DATABASE_PREPARED_STATEMENTS=True)) >= 1


@ON_POSTGRESQL
def test_refreshes_and_sign_outs_through_pgbouncer_in_transaction_mode(pgbouncer_app_factory):  # noqa: F811 (the fixture)
    """More than five of every statement on pooled connections, where a prepared statement would meet another server connection."""
    app = pgbouncer_app_factory()
    for name in ("Ada Lovelace", "Grace Hopper", "Annie Easley"):
        client = app.test_client()
        sign_in(client, name)
        for _ in range(6):
            expire_access_token(app, name)
            assert client.get("/api/profile").status_code == 200
        csrf = client.get("/api/session").get_json()["csrf_token"]
        assert client.post("/auth/logout", data={"csrf_token": csrf}).status_code == 302
        assert client.get("/api/session").status_code == 401
    assert client.get("/readyz").get_json() == {"status": "ready"}
