#!/bin/sh
# Start one app instance as the Docker image does: wait for the database, migrate, then serve.
# With arguments, run them instead (the stand-in service, `flask --app app purge`, a shell).
set -eu
cd "$(dirname "$0")/.."

if [ "$#" -gt 0 ]; then
  exec "$@"
fi

python deploy/wait_for_db.py
# Several replicas may start together: migrations/env.py serialises them with an advisory lock.
flask --app app db upgrade

# gthread: requests mostly wait on the database and the provider, so threads are cheap concurrency.
# gunicorn.conf.py: the access-log format (escaped paths), no trust in X-Forwarded-* (ProxyFix decides), and
# a graceful stop longer than a refresh may take.
# GUNICORN_CMD_ARGS (read by gunicorn itself) adds any other option.
exec gunicorn \
  --config gunicorn.conf.py \
  --bind "${GUNICORN_BIND:-0.0.0.0:${PORT:-8000}}" \
  --worker-class "${GUNICORN_WORKER_CLASS:-gthread}" \
  --workers "${GUNICORN_WORKERS:-2}" \
  --threads "${GUNICORN_THREADS:-4}" \
  --timeout "${GUNICORN_TIMEOUT:-30}" \
  --worker-tmp-dir "${GUNICORN_WORKER_TMP_DIR:-/dev/shm}" \
  --no-control-socket \
  --access-logfile - \
  --error-logfile - \
  'app:create_app()'
