# The sign-in app: one image for the app replicas, the demo's stand-in provider and the purge job.
# Single stage on purpose: every dependency ships a binary wheel (cryptography, psycopg[binary]),
# so a build stage would have no compiler to leave behind and would save nothing.
FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PORT=8000

WORKDIR /app

# Dependencies before the code: editing the app does not reinstall them. The lock pins every package,
# transitive ones included, and pip refuses any file whose hash it does not list.
COPY requirements.lock .
RUN pip install --no-cache-dir --require-hashes -r requirements.lock

# A user without a login or home to run as; the code stays root's and read-only to it.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --shell /usr/sbin/nologin app

COPY . .
# Writable only where the app and the stand-in keep files (SQLite in development, the stand-in's store).
RUN mkdir -p /app/instance /data && chown app:app /app/instance /data

# Numeric, so orchestrators can verify it is not root.
USER 10001:10001
EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('PORT') or '8000'}/healthz\", timeout=4)"]

ENTRYPOINT ["/app/deploy/entrypoint.sh"]
