"""Two ComfyUI hosts in one pytest run (a plugin, loaded by tests/conftest.py).

Host 1 is the ComfyUI tree scripts/find_comfyui.py finds first (0.3.64 here): tests/nodes and tests/integration
run against it in this process, as always. Host 2 is an optional newer tree ($COMFYUI_DIR_2, ~/ComfyUI-0.4.0,
/work/ComfyUI-0.4.0) whose requirements differ, so it has its own venv (.venv-comfyui-<version>, made by
scripts/setup.sh). When both exist, every selected test of tests/nodes and tests/integration is collected a second
time as a proxy item `<node id>@comfyui-<version>`; the first proxy to run starts ONE child pytest in host 2's
venv (COMFYUI_DIR=<host 2>) on exactly those node ids, and each proxy then reports its test's outcome there
(failures with the child's traceback, skips with their reason). So the run ends with one ordinary pytest summary
line counting both hosts, and a per-host tally is printed above it. The child's whole output is kept in
test-artifacts/comfyui-<version>.log.

Host 2 tree present but no venv: its proxies skip with one line saying to run scripts/setup.sh.
COMFYUI_DIR_2= (empty) runs host 1 only.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HOST_DIRS = ("tests/nodes/", "tests/integration/")  # the tests that run inside (or against) a ComfyUI
CHILD_REPORT = "NEWBIE_HOST_REPORT"  # set in the child run: where it writes its per-test outcomes (JSON lines)
SUFFIX = "@comfyui-"


def _finder():
    spec = importlib.util.spec_from_file_location("_newbie_find_comfyui_hosts", REPO / "scripts" / "find_comfyui.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_F = _finder()
IS_CHILD = bool(os.environ.get(CHILD_REPORT))


class Host:
    """A ComfyUI tree the tests run against: path, declared version, the python that runs it."""

    def __init__(self, tree: Path, python: Path | None):
        self.tree, self.version, self.python = tree, _F.comfyui_version(tree), python

    @property
    def label(self) -> str:
        return f"ComfyUI {self.version}"


def hosts() -> tuple[Host | None, Host | None]:
    """(host 1 as this process runs it, host 2 or None). In the child run, host 1 is the child's tree."""
    first = _F.find_comfyui()
    h1 = Host(first, Path(sys.executable)) if first else None
    second = None if IS_CHILD else _F.find_second_comfyui()
    h2 = None
    if second is not None:
        py = REPO / _F.second_venv_name(second) / "bin" / "python"
        h2 = Host(second, py if py.is_file() else None)
    return h1, h2


HOST1, HOST2 = hosts()


def _is_host_test(nodeid: str) -> bool:
    return nodeid.startswith(HOST_DIRS) and SUFFIX not in nodeid


# ------------------------------------------------------------------------------------------- child side
def pytest_runtest_logreport(report):
    """In the child run: one JSON line per test phase (the parent's proxies read them)."""
    path = os.environ.get(CHILD_REPORT)
    if not path:
        return
    reason = None
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = report.longrepr[2]
    row = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome, "reason": reason,
           "text": report.longreprtext if report.failed else "", "duration": report.duration}
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------------------------------ parent side
def pytest_report_header(config):
    lines = [f"ComfyUI host 1: {HOST1.label} at {HOST1.tree} (this process)" if HOST1 else
             "ComfyUI host 1: none found (node and integration tests skip)"]
    if HOST2 is not None:
        how = (f"venv {HOST2.python.parent.parent.name}; tests/nodes + tests/integration re-run there, ids end in "
               f"{SUFFIX}{HOST2.version}" if HOST2.python else "no venv yet: run bash scripts/setup.sh")
        lines.append(f"ComfyUI host 2: {HOST2.label} at {HOST2.tree} ({how})")
    elif not IS_CHILD:
        lines.append("ComfyUI host 2: none (set COMFYUI_DIR_2 to a second ComfyUI tree)")
    return lines


class HostRun:
    """The child pytest run on host 2: started once, on the first proxy's call; its per-test outcomes."""

    def __init__(self, config, host: Host, nodeids: list[str]):
        self.config, self.host, self.nodeids = config, host, nodeids
        self.results: dict[str, list[dict]] | None = None
        art = Path(os.environ.get("NEWBIE_TEST_ARTIFACTS") or REPO / "test-artifacts")
        art.mkdir(parents=True, exist_ok=True)
        self.log = art / f"comfyui-{host.version}.log"
        self.report = art / f"comfyui-{host.version}.jsonl"
        self.seconds = 0.0
        self.rc: int | None = None

    def run(self) -> dict[str, list[dict]]:
        if self.results is not None:
            return self.results
        self.report.unlink(missing_ok=True)
        env = dict(os.environ, COMFYUI_DIR=str(self.host.tree), COMFYUI_DIR_2="", **{CHILD_REPORT: str(self.report)})
        env.pop("PYTEST_ADDOPTS", None)
        args = list(self.nodeids)
        if sum(len(a) + 1 for a in args) > 100_000:  # argv limit: run the whole folders instead
            args = sorted({a.split("::")[0] for a in args})
        cmd = [str(self.host.python), "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *args]
        self.say(f"\n[hosts] running {len(self.nodeids)} node/integration tests on {self.host.label} "
                 f"({self.host.tree}) in {self.host.python.parent.parent.name}; log: {self.log}")
        t0 = time.monotonic()
        with open(self.log, "w", encoding="utf-8") as log:
            self.rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL).returncode
        self.seconds = time.monotonic() - t0
        results: dict[str, list[dict]] = {}
        if self.report.is_file():
            for line in self.report.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                results.setdefault(row["nodeid"], []).append(row)
        self.say(f"[hosts] {self.host.label}: child pytest exit {self.rc} after {self.seconds:.0f} s; "
                 f"last line: {self.tail(1).strip()}")
        self.results = results
        return results

    def say(self, line: str) -> None:
        """A line on the terminal now (the proxy runs inside pytest's output capture, so step outside it)."""
        tr = self.config.pluginmanager.get_plugin("terminalreporter")
        capman = self.config.pluginmanager.get_plugin("capturemanager")
        if tr is None:
            return
        if capman is None:
            tr.write_line(line)
            return
        with capman.global_and_fixture_disabled():
            tr.write_line(line)

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class HostFailure(Exception):
    """A test that failed on host 2 (carries the child's report text)."""


class HostProxy(pytest.Item):
    """Stands for `target` (a host-1 node id) run on host 2; its outcome is the child run's."""

    def __init__(self, *, target: str, host: Host, **kw):
        super().__init__(**kw)
        self.target, self.host = target, host

    def runtest(self):
        if self.host.python is None:
            pytest.skip(f"{self.host.label} at {self.host.tree}: no venv {_F.second_venv_name(self.host.tree)} "
                        f"(run bash scripts/setup.sh)")
        rows = self.config._newbie_host_run.run().get(self.target)
        if not rows:
            raise HostFailure(f"{self.target} did not run on {self.host.label} (child pytest exit "
                              f"{self.config._newbie_host_run.rc}); end of its log:\n"
                              f"{self.config._newbie_host_run.tail()}")
        failed = [r for r in rows if r["outcome"] == "failed"]
        if failed:
            raise HostFailure("\n".join(f"[{self.host.label}, {r['when']}]\n{r['text']}" for r in failed))
        skipped = [r for r in rows if r["outcome"] == "skipped"]
        if skipped:
            reason = (skipped[0]["reason"] or "skipped").removeprefix("Skipped: ")
            pytest.skip(f"{self.host.label}: {reason}")

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, HostFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return REPO / self.target.split("::")[0], None, self.name


@pytest.hookimpl(trylast=True)  # after -k/-m deselection: only what was selected runs again
def pytest_collection_modifyitems(session, config, items):
    if IS_CHILD or HOST2 is None:
        return
    targets = [it for it in items if _is_host_test(it.nodeid)]
    if not targets:
        return
    config._newbie_host_run = HostRun(config, HOST2, [it.nodeid for it in targets])
    for it in targets:
        name = f"{it.nodeid}{SUFFIX}{HOST2.version}"
        items.append(HostProxy.from_parent(session, name=name, nodeid=name, target=it.nodeid, host=HOST2))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Per-host tally above pytest's own summary line."""
    if IS_CHILD:
        return
    def key_of(nodeid: str) -> str:
        if SUFFIX in nodeid:
            return f"{HOST2.label} (host 2)" if HOST2 else "host 2"
        if _is_host_test(nodeid):
            return f"{HOST1.label} (host 1)" if HOST1 else "host 1 (none)"
        return "core (no ComfyUI)"

    tally: dict[str, dict[str, int]] = {}
    seconds: dict[str, float] = {}
    for outcome, reports in terminalreporter.stats.items():
        for rep in reports:
            nodeid, when = getattr(rep, "nodeid", None), getattr(rep, "when", None)
            if nodeid is None or when is None:
                continue
            key = key_of(nodeid)
            seconds[key] = seconds.get(key, 0.0) + getattr(rep, "duration", 0.0)  # setup + call + teardown
            if outcome in ("failed", "skipped", "error") or (outcome == "passed" and when == "call"):
                tally.setdefault(key, {}).setdefault(outcome, 0)
                tally[key][outcome] += 1
    if not tally:
        return
    terminalreporter.write_sep("-", "per host")
    for key, counts in tally.items():
        terminalreporter.write_line(f"{key}: " + ", ".join(f"{n} {k}" for k, n in counts.items())
                                    + f" ({seconds.get(key, 0.0):.0f} s)")
    run = getattr(config, "_newbie_host_run", None)
    if run is not None and run.rc is not None:
        terminalreporter.write_line(f"{run.host.label} child run: {run.seconds:.0f} s, exit {run.rc}, log {run.log}")
