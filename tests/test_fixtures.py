"""The database fixtures keep tests apart: each starts empty at the migrations' head, whatever the one before did."""

import psycopg
import pytest
from sqlalchemy import func, select, text

from conftest import HEAD, MIGRATED_SCHEMAS, SCHEMA, at_head, empty_postgres, schema_of, sign_in
from models import RefreshEvent, User, UserSession, db

# The first turn leaves a fault in the schema that refuses the next sign-in of the same person.
REFUSE_ADA = {
    "sqlite": "CREATE TRIGGER refuse_ada BEFORE INSERT ON users WHEN NEW.name = 'Ada Lovelace' BEGIN SELECT RAISE(ABORT, 'refused'); END",
    "postgresql": "ALTER TABLE users ADD CONSTRAINT refuse_ada CHECK (name <> 'Ada Lovelace') NOT VALID",
}


@pytest.mark.parametrize("turn", ["first", "second"])
def test_each_test_starts_empty_at_the_head_with_ids_from_one(app, client, turn):
    """Run twice in a row on each database: the second sees nothing of the first's sign-in, nor of its change to the schema."""
    with app.app_context():
        assert db.session.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == HEAD
        for model in (User, UserSession, RefreshEvent):
            assert db.session.execute(select(func.count()).select_from(model)).scalar_one() == 0, (turn, model.__tablename__)
    assert sign_in(client).status_code == 302
    with app.app_context():
        assert db.session.execute(select(User.id)).scalar_one() == 1  # sequences start again too
        db.session.execute(text(REFUSE_ADA[db.engine.dialect.name]))
        db.session.commit()


DAMAGE = {
    "schema dropped": "DROP SCHEMA public CASCADE; CREATE SCHEMA public",
    "another revision": "UPDATE alembic_version SET version_num = 'older'",
    "check constraint": "ALTER TABLE refresh_events ADD CONSTRAINT refuse_refreshed CHECK (outcome <> 'refreshed') NOT VALID",
    "index dropped": "DROP INDEX ix_user_sessions_expires_at",
    "trigger": "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NULL; END';"
    " CREATE TRIGGER refuse BEFORE INSERT ON users FOR EACH ROW EXECUTE FUNCTION refuse()",
}


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_schema_a_test_changed_is_migrated_again_for_the_next(database_url, damage):
    plain = database_url.replace("+psycopg", "")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(damage)
    empty_postgres(database_url)
    with psycopg.connect(plain, autocommit=True) as conn:
        assert at_head(conn)
        assert schema_of(conn) == MIGRATED_SCHEMAS[database_url]
        assert "refuse" not in schema_text(conn)


def schema_text(conn: psycopg.Connection) -> str:
    """Return the schema description that schema_of digests, in full."""
    return conn.execute(SCHEMA.replace("md5(coalesce(", "(coalesce(")).fetchone()[0]
