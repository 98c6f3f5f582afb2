"""The database fixtures keep tests apart: each starts empty at the migrations' head, whatever the one before did."""

import psycopg
import pytest
from sqlalchemy import func, select, text

from conftest import HEAD, at_head, empty_postgres, sign_in
from models import RefreshEvent, User, UserSession, db


@pytest.mark.parametrize("turn", ["first", "second"])
def test_each_test_starts_empty_with_ids_from_one(app, client, turn):
    """Run twice in a row on each database: the second sees nothing of the first's sign-in."""
    with app.app_context():
        assert db.session.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == HEAD
        for model in (User, UserSession, RefreshEvent):
            assert db.session.execute(select(func.count()).select_from(model)).scalar_one() == 0, (turn, model.__tablename__)
    sign_in(client)
    with app.app_context():
        assert db.session.execute(select(User.id)).scalar_one() == 1  # sequences start again too


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("damage", ["DROP SCHEMA public CASCADE; CREATE SCHEMA public", "UPDATE alembic_version SET version_num = 'older'"])
def test_a_schema_a_test_broke_is_migrated_again_for_the_next(database_url, tmp_path, damage):
    plain = database_url.replace("+psycopg", "")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(damage)
    empty_postgres(database_url, tmp_path)
    with psycopg.connect(plain, autocommit=True) as conn:
        assert at_head(conn)
        assert conn.execute("SELECT count(*) FROM users").fetchone() == (0,)
