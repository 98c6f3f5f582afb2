"""Readiness for orchestrators: /readyz answers whether this process should receive traffic.

/healthz (api.py) stays database-free: it says the process lives. /readyz also needs the database to
answer with its schema at the migration head, and this process not to be stopping: a balancer or
Kubernetes then sends new requests elsewhere while requests already here finish.
"""

import threading
from functools import cache

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from flask import Blueprint, current_app, jsonify
from sqlalchemy.exc import SQLAlchemyError

import policy
from models import db

bp = Blueprint("health", __name__)

# Set in a gunicorn worker when it receives SIGTERM (gunicorn.conf.py), for the graceful stop's length.
stopping = threading.Event()


@cache
def migration_heads(directory: str) -> frozenset[str]:
    """The revisions the code's migrations end at (read once per process)."""
    config = Config()
    config.set_main_option("script_location", directory)
    return frozenset(ScriptDirectory.from_config(config).get_heads())


@bp.get("/readyz")
@policy.no_session
def readyz():
    """Answer 200 when this process can serve, else 503 naming what is missing."""
    if stopping.is_set():
        return _not_ready("shutting_down", "This instance is stopping; requests already here finish.")
    try:
        with db.engine.connect() as connection:
            current = frozenset(MigrationContext.configure(connection).get_current_heads())
    except SQLAlchemyError as exc:
        current_app.logger.warning("readiness: database unreachable: %s", type(getattr(exc, "orig", None) or exc).__name__)
        return _not_ready("database_unreachable", "The database does not answer.")
    heads = migration_heads(current_app.extensions["migrate"].directory)
    if current != heads:
        return _not_ready("migrations_pending", "The database schema is not at the migration head; run flask --app app db upgrade.")
    return jsonify(status="ready")


def _not_ready(reason: str, message: str):
    return jsonify(status="not_ready", reason=reason, message=message), 503
