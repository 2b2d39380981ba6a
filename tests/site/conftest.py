"""Fixtures for the rendered-site tests: a local web server and a headless Chromium.

These tests check the HTML that ``make book`` writes to ``_build/html``. Run them
with ``pytest tests/site`` after building. A plain ``pytest tests`` run (the unit
tests) skips collecting them while the site has not been built; named
explicitly, they fail until it has been.

Nothing here touches the network: the pages are served from 127.0.0.1, MathJax
is served from a local npm copy and every other outside request is refused.
"""

from __future__ import annotations

import functools
import os
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SITE_TESTS = Path(__file__).resolve().parent
SITE = REPO_ROOT / "_build" / "html"
MATHJAX_DEFAULT = REPO_ROOT / ".cache" / "mathjax"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _named_explicitly(config) -> bool:
    """Whether the command line names tests/site or something inside it."""
    base = Path(config.invocation_params.dir)
    for arg in config.invocation_params.args:
        if arg.startswith("-"):
            continue
        path = (base / arg.split("::")[0]).resolve()
        if path == SITE_TESTS or SITE_TESTS in path.parents:
            return True
    return False


def pytest_ignore_collect(collection_path, config):
    """Leave the browser tests out of unit-test runs while no site is built."""
    if collection_path.parent == SITE_TESTS and collection_path.name.startswith("test_"):
        if not (SITE / "index.html").is_file() and not _named_explicitly(config):
            return True
    return None


@pytest.fixture(scope="session")
def site() -> Path:
    if not (SITE / "index.html").is_file():
        pytest.fail(
            f"{SITE.relative_to(REPO_ROOT)} is missing: build the book first with `make book`",
            pytrace=False,
        )
    return SITE


@pytest.fixture(scope="session")
def mathjax_dir() -> Path:
    """The local MathJax 3 package (the folder that holds ``es5/``)."""
    given = os.environ.get("MATHJAX_DIR")
    root = Path(given) if given else MATHJAX_DEFAULT
    for candidate in (root, root / "node_modules" / "mathjax"):
        if (candidate / "es5" / "tex-mml-chtml.js").is_file():
            return candidate
    pytest.fail(
        f"no local MathJax 3 in {root}: run `npm install --prefix .cache/mathjax mathjax@3` "
        "in the repository root, or set MATHJAX_DIR to a folder holding MathJax's es5/",
        pytrace=False,
    )


@pytest.fixture(scope="session")
def server(site: Path):
    """Serve ``_build/html`` on a free port of 127.0.0.1; yields the base URL."""

    class QuietHandler(SimpleHTTPRequestHandler):
        def log_message(self, format, *args):  # noqa: A002 - the base class's name
            pass

    handler = functools.partial(QuietHandler, directory=str(site))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, name="site-server", daemon=True)
    thread.start()
    host, port = httpd.server_address[:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    executable = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(executable).is_file():
        pytest.fail(
            f"no Chromium at {executable}: install it (e.g. `apt-get install chromium`) "
            "or set CHROMIUM to its path",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            browser.close()
