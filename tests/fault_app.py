"""The real app with one route that fails, for the tests that read how a traceback is logged under gunicorn."""

from app import create_app

app = create_app()


@app.get("/test-fault")
def fault():
    raise RuntimeError("a fault the log test asked for")
