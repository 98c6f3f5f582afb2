"""The migrations build exactly the models' schema, go down and up again, and tolerate replicas starting together."""

import shutil
import subprocess
import threading

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from flask_migrate import downgrade, migrate, upgrade
from sqlalchemy import inspect, text

from app import MIGRATIONS, create_app
from conftest import close_databases, make_config, migrate_fresh
from models import db
from servers import BIN, ROOT, server_env


@pytest.fixture
def database_url(empty_database_url):
    """Start from a database with no schema: these tests run the migrations themselves."""
    return empty_database_url


@pytest.fixture
def app(app_factory):
    app = app_factory()
    migrate_fresh(app)
    return app


def drift(app) -> list:
    """Compare the migrated database with the models as `flask db migrate` would, types included."""
    with app.app_context(), db.engine.connect() as conn:
        options = dict(app.extensions["migrate"].configure_args) | {"compare_type": True}
        return compare_metadata(MigrationContext.configure(conn, opts=options), db.metadata)


def test_migrations_build_the_models_schema(app):
    assert drift(app) == []
    with app.app_context():
        tables = set(inspect(db.engine).get_table_names())
    assert {"users", "user_sessions", "refresh_events", "alembic_version"} <= tables


def test_comparison_sees_drift_through_the_type_decorators(app):
    """The check is real: a missing index, a stray column and (PostgreSQL) changed column types all show."""
    with app.app_context(), db.engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_user_sessions_expires_at"))
        conn.execute(text("ALTER TABLE users ADD COLUMN stray INTEGER"))
        if conn.dialect.name == "postgresql":
            # UTCDateTime is DateTime(timezone=True), EncryptedText is Text: a lookalike column must not pass.
            conn.execute(text("ALTER TABLE users ALTER COLUMN created_at TYPE timestamp without time zone"))
            conn.execute(text("ALTER TABLE users ALTER COLUMN refresh_token TYPE varchar(200)"))
    found = drift(app)
    flat = [item for entry in found for item in (entry if isinstance(entry, list) else [entry])]
    kinds = {(item[0], item[2] if item[0] == "modify_type" else None) for item in flat}
    assert ("add_index", None) in kinds
    assert ("remove_column", None) in kinds
    if app.config["SQLALCHEMY_DATABASE_URI"].startswith("postgresql"):
        changed = {item[3] for item in flat if item[0] == "modify_type"}
        assert changed == {"created_at", "refresh_token"}


def test_downgrade_to_base_then_upgrade_again(app):
    with app.app_context():
        downgrade(revision="base")
        assert set(inspect(db.engine).get_table_names()) <= {"alembic_version"}
        upgrade()
    assert drift(app) == []


def test_autogenerate_finds_nothing_to_add(app, tmp_path):
    """`flask db migrate` on the migrated database writes no migration: no model change lacks one."""
    directory = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, directory)
    before = sorted(p.name for p in (directory / "versions").glob("*.py"))
    with app.app_context():
        migrate(directory=str(directory), message="should not be written")
    assert sorted(p.name for p in (directory / "versions").glob("*.py")) == before


def test_autogenerate_writes_the_decorators_as_database_types(app, tmp_path):
    """A new migration names sa.DateTime(timezone=True) and sa.Text(), never the models' classes."""
    directory = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, directory)
    for old in (directory / "versions").glob("*.py"):
        old.unlink()
    with app.app_context():
        downgrade(revision="base")
        migrate(directory=str(directory), message="from scratch")
        (written,) = (directory / "versions").glob("*.py")
        script = written.read_text()
        assert "sa.DateTime(timezone=True)" in script
        assert "sa.Text()" in script
        assert "models." not in script and "UTCDateTime" not in script and "EncryptedText" not in script
        # The rendered migration is runnable and builds the same schema.
        upgrade(directory=str(directory))
    assert drift(app) == []


@pytest.mark.slow
@pytest.mark.parametrize("empty_database_url", ["postgresql"], indirect=True)
def test_replicas_migrating_together_all_succeed(tmp_path, empty_database_url):
    """Three `flask db upgrade` at once on one empty PostgreSQL database: one migrates, the others wait."""
    app = create_app(make_config(tmp_path, empty_database_url))
    env = server_env(tmp_path, empty_database_url, "http://127.0.0.1:9/standin")
    results: list[subprocess.CompletedProcess] = []
    barrier = threading.Barrier(3)

    def run() -> None:
        barrier.wait()
        results.append(subprocess.run([BIN / "flask", "--app", "app", "db", "upgrade"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.returncode for r in results] == [0, 0, 0], "\n".join(r.stderr[-1500:] for r in results)
    assert drift(app) == []
    close_databases(app)
