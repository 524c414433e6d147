"""Browser fixtures: the session's ComfyUI server (tests/integration/conftest.py `comfy`, tiny models in place)
opened in headless system Chromium through Playwright.

Needs, besides a ComfyUI tree: the Python `playwright` package (in the [test] extras) and a Chromium executable
(`apt-get install -y chromium`; `.ci/run` installs it when it can; or $NEWBIE_CHROMIUM). Playwright's own browser
download is never used. Without one of them every test here is skipped with one summary line.

Screenshots go to $NEWBIE_TEST_ARTIFACTS/browser/ (default: <repo>/test-artifacts/browser/, git-ignored).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from comfy_server import REPO_ROOT
from frontend import CHROMIUM_ARGS, UI_SETTINGS, ComfyPage, find_chromium


def _missing() -> str | None:
    """Why the browser tests cannot run here (one line), or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "browser tests: the Python package playwright is missing (pip install -e '.[test]')"
    if find_chromium() is None:
        return "browser tests: no chromium executable (apt-get install -y chromium, or set NEWBIE_CHROMIUM)"
    return None


MISSING = _missing()


def pytest_runtest_setup(item):
    # A hook, like the integration conftest's: the same reason for every test → ONE line in the -ra summary.
    if MISSING:
        pytest.skip(MISSING)


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    root = Path(os.environ.get("NEWBIE_TEST_ARTIFACTS") or REPO_ROOT / "test-artifacts")
    path = root / "browser"
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.png"):  # this run's screenshots only (the folder belongs to these tests)
        old.unlink()
    return path


@pytest.fixture(scope="module")
def browser():
    """System Chromium, headless, launched by Playwright (module scope: the sync API's event loop is closed before
    later, non-browser test modules run)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=find_chromium(), args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="session")
def ui_server(comfy):
    """The session server (tiny models placed) with the UI settings the browser tests rely on (see UI_SETTINGS)."""
    for key, value in UI_SETTINGS.items():
        r = comfy.http.post(f"{comfy.url}/settings/{key}", json=value, timeout=30)
        assert r.status_code == 200, f"POST /settings/{key}: HTTP {r.status_code} {r.text[:200]}"
    return comfy


@pytest.fixture
def ui(browser, ui_server, request, artifacts_dir):
    """A fresh tab on the web UI; on a failed test its screenshot is kept as <test name>-FAILED.png."""
    page = ComfyPage.open(browser, ui_server)
    yield page
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        name = request.node.name.replace("/", "_").replace("[", "-").rstrip("]")
        try:
            page.screenshot(artifacts_dir / f"{name}-FAILED.png")
        except Exception:  # noqa: BLE001  (a dead page must not hide the test's own error)
            pass
    page.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    if rep.when == "call":
        item.rep_call = rep
    return rep
