"""Serve the real app under gunicorn on a free port, and drive Debian's Chromium against it.

Used by tests/test_browser.py and by scripts/screenshots.
"""

import contextlib
from collections.abc import Iterator
from pathlib import Path

from servers import ROOT, Gunicorn, free_port, migrate, server_env

__all__ = ["AXE", "CHROMIUM", "ROOT", "VIEWPORT", "LiveServer", "axe_findings", "launch_chromium", "playwright_session", "sign_in"]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1100, "height": 800}
# axe-core, pinned in tests/a11y/package-lock.json; .ci/run installs it with npm ci.
AXE = ROOT / "tests" / "a11y" / "node_modules" / "axe-core" / "axe.min.js"
# The levels a page must not have a single finding at.
AXE_IMPACTS = ("serious", "critical")
# A 65 s access token with the default 60 s leeway: the first silent refresh is due 5 s after sign-in.
ACCESS_TTL = 65
LEEWAY = 60


class LiveServer:
    """The app with its embedded stand-in, under gunicorn (2 workers x 4 threads), on its own databases in a folder."""

    def __init__(self, folder: Path, **settings: str):
        self.folder = Path(folder)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # The pages show (and the tests count) the refresh a request makes at the leeway: none runs ahead of it.
        timing = {"STANDIN_ACCESS_TOKEN_TTL": str(ACCESS_TTL), "TOKEN_REFRESH_LEEWAY": str(LEEWAY), "TOKEN_REFRESH_AHEAD": "0"}
        self.env = server_env(self.folder, f"sqlite:///{self.folder / 'app.sqlite'}", f"{self.url}/standin", **(timing | settings))
        self.server = Gunicorn(self.env, self.port, self.folder / "gunicorn.log", workers=2)

    def __enter__(self) -> "LiveServer":
        self.folder.mkdir(parents=True, exist_ok=True)
        migrate(self.env)
        self.server.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.kill()


@contextlib.contextmanager
def playwright_session() -> Iterator:
    """Run Playwright, and on the way out wait until its driver process has really exited.

    Playwright may return while its driver is still exiting; the driver's Popen object would then be
    collected while the process runs, which warns (an error under pytest's filterwarnings=error).
    """
    from playwright.sync_api import expect, sync_playwright

    # The suite runs on several processes on 2 cores: a page that goes through a provider and back may
    # take longer than the 5 s an expectation waits by default.
    expect.set_options(timeout=20_000)
    manager = sync_playwright()
    with manager as playwright:
        try:
            driver = manager._client._transport._proc._transport._proc  # Playwright internals; absent in other versions
        except AttributeError:
            driver = None
        yield playwright
    if driver is not None:
        driver.wait(timeout=30)


def launch_chromium(playwright):
    """Start Debian's Chromium headless (Playwright's own browser download is not used)."""
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)


def sign_in(page, base_url: str, name: str, next_path: str = "/") -> None:
    """Sign in through the stand-in's page as a person would: open the app, type a name, click Sign in."""
    page.goto(f"{base_url}/auth/login?next={next_path}")
    page.get_by_label("Your name").fill(name)
    page.get_by_role("button", name="Sign in", exact=True).click()
    page.wait_for_url(f"{base_url}{next_path}")


def axe_findings(page) -> list[str]:
    """Run axe-core on the page as it is now; return its serious and critical findings, one line each.

    The page's context needs bypass_csp=True: the app's CSP (rightly) refuses the injected script.
    """
    page.add_script_tag(path=str(AXE))
    report = page.evaluate("() => axe.run(document, {resultTypes: ['violations']})")
    return [
        f"{page.url}: {v['impact']} {v['id']} ({v['help']}) at {', '.join(' '.join(n['target']) for n in v['nodes'][:5])}"
        for v in report["violations"]
        if v["impact"] in AXE_IMPACTS
    ]
