"""The README's commands work as written, pasted into a fresh shell with no virtual environment activated."""

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests

from servers import ROOT, free_port, http_sign_in

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A fresh shell has none of the app's settings.
APP_SETTINGS = ("OAUTH_", "APS_", "STANDIN_", "TOKEN_", "DATABASE_URL", "SECRET_KEY", "APP_ENV", "SESSION_COOKIE", "PORT", "HOST")
# Installed only into .venv: in a fresh shell these names are missing, or are another Python's.
VENV_ONLY = ("flask", "gunicorn", "python", "pip", "pytest", "ruff", "uv", "alembic", "playwright")
BARE = re.compile(rf"(?:^|&&|\|\||;|\||\$\(|\bexec\s)\s*({'|'.join(VENV_ONLY)})(?=\s|$)", re.M)


def code_in(markdown: str) -> list[str]:
    """Return the text of every fenced block, indented block and inline code span."""
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", markdown, re.S | re.M)
    rest = re.sub(r"^```[^\n]*\n.*?^```", "", markdown, flags=re.S | re.M)
    indented = ["\n".join(line[4:] for line in block.splitlines()) for block in re.findall(r"(?:^(?:    |\t)\S.*\n?)+", rest, re.M)]
    rest = re.sub(r"(?:^(?:    |\t)\S.*\n?)+", "", rest, flags=re.M)
    inline = re.findall(r"`([^`\n]+)`", rest)
    return fenced + indented + inline


def test_commands_name_the_virtual_environments_tools():
    """`flask --app app purge` fails in a fresh shell (no Flask-Migrate in the global flask): write .venv/bin/flask."""
    bare = [f"{doc.name}: {code.strip()}" for doc in DOCS for code in code_in(doc.read_text()) if BARE.search(code)]
    assert not bare, "\n".join(bare)


def commands_in(doc: Path) -> list[str]:
    """Return the commands a reader would paste: shell blocks, and inline spans that start like a command."""
    markdown = doc.read_text()
    blocks = [b for lang, b in re.findall(r"^```([^\n]*)\n(.*?)^```", markdown, re.S | re.M) if lang.strip() in ("", "bash", "sh", "console")]
    rest = re.sub(r"^```[^\n]*\n.*?^```", "", markdown, flags=re.S | re.M)
    for block in re.findall(r"(?:^(?:    |\t)\S.*\n?)+", rest, re.M):
        block = "\n".join(line[4:] for line in block.splitlines())
        if doc.name == "README.md" or STARTS_LIKE_A_COMMAND.match(block):
            blocks.append(block)
    rest = re.sub(r"(?:^(?:    |\t)\S.*\n?)+", "", rest, flags=re.M)
    inline = [span for span in re.findall(r"`([^`\n]+)`", rest) if STARTS_LIKE_A_COMMAND.match(span)]
    lines = [re.sub(r"\s+#.*$", "", line).strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line] + inline


STARTS_LIKE_A_COMMAND = re.compile(r"(?:[A-Z_]+=\S+ )*(?:bash |python3 |\.venv/bin/|docker |git |export )")
# What the fresh-clone test does with each command the README and docs/ show. A command that matches
# none of these fails the test: say here whether it runs offline, or why it cannot run in a test.
RUN, DEMO, SUITE = "run", "demo", "suite"
COMMANDS = [
    (r"bash scripts/demo", DEMO),
    (r"bash scripts/test", SUITE),
    (r"\.venv/bin/flask --app app (purge|rotate-token-keys)", RUN),
    (r"python3 deploy/make_env\.py", RUN),
    (r"python3 -c ['\"]import secrets; print\(secrets\.token_hex\(32\)\)['\"]", RUN),
    (r"\.venv/bin/python -c ['\"]from cryptography\.fernet import Fernet; print\(Fernet\.generate_key\(\)\.decode\(\)\)['\"]", RUN),
    (r"\.venv/bin/ruff (check|format --check) \.", RUN),
    (r"(PORT|HOST|PYTHON)=\S+ bash scripts/demo", "tests/test_scripts.py runs the demo with PORT, HOST and PYTHON"),
    (r"bash scripts/test .+", "the same script as bash scripts/test, which runs here on one test file"),
    (r"\.venv/bin/python -m pytest -m \w+", "a part of the suite that bash scripts/test runs"),
    (r"bash \.ci/run", "CI itself: it installs system packages"),
    (r"bash scripts/lock.*|\.venv/bin/uv tool run pip-audit .*", "needs the package index or the advisory database"),
    (r"docker compose.*", "needs a Docker engine (tests/test_deploy.py checks the compose file and runs the entrypoint)"),
    (r"git clone <this repository> .*", "this test is the clone"),
    (r"export .*", "configures a real provider, which a test cannot reach"),
    (
        r"\.venv/bin/(flask --app app db upgrade && \.venv/bin/)?gunicorn 'app:create_app\(\)'|\.venv/bin/flask --app app db upgrade .*",
        "the production start with a real provider",
    ),
    (r'PATH="\$PWD/\.venv/bin:\$PATH" deploy/entrypoint\.sh', "the production start with a real provider (tests/test_deploy.py runs the entrypoint)"),
    (r"\.venv/bin/flask --app app run.*", "Flask's development server (tests/test_production_config.py runs it on another port)"),
    (r'echo "TLS_CERT_DIR=.*" >> \.env', "writes the TLS settings for docker compose"),
    (r"\.venv/bin/python bench/run\.py.*", "a benchmark: 15 minutes, and it needs wrk"),
    (r"\.venv/bin/python bench/soak\.py.*", "the fault soak: 6.5 minutes, its own PostgreSQL server, as root"),
]


def what_to_do(command: str) -> str | None:
    return next((action for pattern, action in COMMANDS if re.fullmatch(pattern, command)), None)


def test_every_command_in_the_readme_is_classified():
    found = {command for doc in DOCS for command in commands_in(doc)}
    assert {"bash scripts/demo", "bash scripts/test", ".venv/bin/flask --app app purge"} <= found
    unknown = sorted(c for c in found if what_to_do(c) is None)
    assert not unknown, "say in COMMANDS whether these run offline:\n" + "\n".join(unknown)


@pytest.mark.slow
def test_readme_commands_work_in_a_fresh_clone(tmp_path):
    """Copy the repository as git would clone it, and run every offline command in a fresh shell: no venv, no settings."""
    clone = tmp_path / "clone"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, check=True)
    for name in filter(None, listed.stdout.decode().split("\0")):
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV" and not k.startswith(APP_SETTINGS)}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if ".venv" not in p)
    commands = list(dict.fromkeys(c for doc in DOCS for c in commands_in(doc)))
    failures, ran = [], []

    def run(command: str, timeout: int = 600) -> None:
        ran.append(command)
        done = subprocess.run(["bash", "-c", command], cwd=clone, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            failures.append(f"{command}: exit {done.returncode}\n{done.stdout[-1500:]}{done.stderr[-1500:]}")

    # The demo first: it makes .venv, which the other commands use.
    port = free_port()
    with open(tmp_path / "demo.log", "wb") as log:
        demo = subprocess.Popen(
            ["bash", "-c", "bash scripts/demo"], cwd=clone, env=env | {"PORT": str(port)}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        base = f"http://localhost:{port}"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and demo.poll() is None:
            try:
                if requests.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        assert demo.poll() is None, (tmp_path / "demo.log").read_text()[-3000:]
        assert http_sign_in(base, "Fresh Clone").get(f"{base}/api/session", timeout=10).json()["user"]["name"] == "Fresh Clone"
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGTERM)
            demo.wait(timeout=30)
    for command in commands:
        if what_to_do(command) == RUN and "ruff" not in command:
            run(command)
    # The suite on one file (in one process: one file gains nothing from more): installs the test tools, lints the whole clone, runs pytest.
    run("TEST_PROCESSES=1 bash scripts/test -q -x tests/test_auth.py", timeout=900)
    for command in commands:
        if what_to_do(command) == RUN and "ruff" in command:
            run(command)
    assert not failures, "\n\n".join(failures)
    assert {".venv/bin/flask --app app purge", ".venv/bin/flask --app app rotate-token-keys", "python3 deploy/make_env.py"} <= set(ran)
