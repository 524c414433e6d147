"""A real ComfyUI server in a throw-away base directory, for integration tests.

    with ComfyServer(models={"vae/ae.safetensors": "/path/ae.safetensors"}) as srv:
        pid = srv.queue_prompt(api_graph)
        entry = srv.wait_for(pid, timeout=60)          # the /history entry; raises on error/timeout
        png = srv.view(**srv.output_images(entry)[0])

Layout of BASE (a temp dir unless given): custom_nodes/<pack_name> -> the repo root (symlink),
models/<folder>/<file>, user/default/comfy.settings.json ({"Comfy.TutorialCompleted": true}),
input/, output/, temp/ (ComfyUI's own), server.log (stdout+stderr of the server).

The server is `python main.py --cpu --listen 127.0.0.1 --port <free> --disable-auto-launch
--base-directory BASE --database-url sqlite:///:memory:` run from the ComfyUI tree with this interpreter
(sys.executable), so it uses the venv the tests run in. Every started server is stopped by stop(),
by the context manager, and as a last resort at interpreter exit (atexit).
Only stdlib + requests + websocket-client.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
from pathlib import Path
from typing import Any

import requests

REPO_ROOT = Path(__file__).resolve().parents[2]
PACK_NAME = "newbie_staged"  # folder name under custom_nodes/ -> python_module "custom_nodes.newbie_staged"

sys.path.insert(0, str(REPO_ROOT / "scripts"))
from find_comfyui import find_comfyui  # noqa: E402  (re-exported for conftest/tests)

__all__ = ["ComfyServer", "PromptError", "EventListener", "find_comfyui", "free_port", "pack_node_ids",
           "REPO_ROOT", "PACK_NAME"]

_LIVE: "weakref.WeakSet[ComfyServer]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for srv in list(_LIVE):
        srv.stop()


class PromptError(RuntimeError):
    """A prompt was rejected (HTTP 400) or its execution failed / was interrupted."""

    def __init__(self, message: str, node_errors: dict | None = None, entry: dict | None = None):
        super().__init__(message)
        self.node_errors = node_errors or {}
        self.entry = entry  # /history entry, when execution failed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, comfy_dir: str | Path | None = None, *, pack_dir: str | Path | None = REPO_ROOT,
                 pack_name: str = PACK_NAME, models: dict[str, str | Path] | None = None, copy_models: bool = True,
                 base: str | Path | None = None, extra_args: list[str] = (), start_timeout: float = 90.0,
                 python: str = sys.executable):
        found = Path(comfy_dir) if comfy_dir else find_comfyui()
        if found is None:
            raise RuntimeError("no ComfyUI tree: set COMFYUI_DIR=... (see README)")
        self.comfy_dir = Path(found).resolve()
        self.pack_dir, self.pack_name = pack_dir, pack_name
        self._own_base = base is None
        self.base = Path(base) if base else Path(tempfile.mkdtemp(prefix="comfy_base_"))
        self.extra_args, self.start_timeout, self.python = list(extra_args), start_timeout, python
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.http = requests.Session()
        self._prepare_base()
        if models:
            self.place_models(models, copy=copy_models)

    # ---------------------------------------------------------------- set-up / lifecycle
    def _prepare_base(self) -> None:
        for d in ("custom_nodes", "models", "user/default", "input", "output", "temp"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        if self.pack_dir is not None:
            link = self.base / "custom_nodes" / self.pack_name
            if not link.exists():
                link.symlink_to(Path(self.pack_dir).resolve(), target_is_directory=True)
        settings = self.base / "user" / "default" / "comfy.settings.json"
        settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))

    def place_models(self, models: dict[str, str | Path], copy: bool = True) -> dict[str, Path]:
        """Put {"<folder_key>/<filename>": source_path} into BASE/models/<folder_key>/<filename>.

        Copies by default: the pack's loaders refuse symlinks that lead out of the model folders (issue 15);
        copy=False symlinks (for files only ComfyUI's own loaders read, e.g. a big FLUX VAE).

        Works before or after start(): ComfyUI's file-list cache is keyed on folder mtimes."""
        placed = {}
        for rel, src in models.items():
            dst = self.base / "models" / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.is_symlink() or dst.exists():
                dst.unlink()
            src = Path(src).resolve()
            if not src.exists():
                raise FileNotFoundError(f"model source {src} (for models/{rel}) does not exist")
            if copy:
                shutil.copy2(src, dst)
            else:
                dst.symlink_to(src)
            placed[rel] = dst
        return placed

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.base / "server.log"

    def start(self) -> "ComfyServer":
        if self.proc is not None:
            return self
        self.port = free_port()
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--base-directory", str(self.base),
               "--database-url", "sqlite:///:memory:", *self.extra_args]
        log = open(self.log_path, "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        log.close()
        _LIVE.add(self)
        t0, deadline = time.monotonic(), time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                self.stop()
                raise RuntimeError(f"ComfyUI exited with code {rc} during start-up; log tail:\n{self.log_tail()}")
            try:
                if self.http.get(self.url + "/object_info/EmptyImage", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"ComfyUI did not answer /object_info within {self.start_timeout:.0f} s; "
                                   f"log tail:\n{self.log_tail()}")
            time.sleep(0.25)
        self.start_seconds = time.monotonic() - t0
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait, SIGKILL fallback. Idempotent."""
        proc, self.proc = self.proc, None
        _LIVE.discard(self)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.http.close()

    def cleanup(self) -> None:
        """stop() and delete BASE when we created it."""
        self.stop()
        if self._own_base:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- log
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # ---------------------------------------------------------------- HTTP API
    def _get(self, path: str, **params) -> requests.Response:
        r = self.http.get(self.url + path, params=params or None, timeout=30)
        r.raise_for_status()
        return r

    def _post(self, path: str, payload: Any) -> requests.Response:
        return self.http.post(self.url + path, json=payload, timeout=30)

    def object_info(self, node_id: str | None = None) -> dict:
        """All nodes ({id: info}), or one node's info (KeyError if it is not registered)."""
        if node_id is None:
            return self._get("/object_info").json()
        data = self._get(f"/object_info/{node_id}").json()
        if node_id not in data:
            raise KeyError(f"node {node_id!r} is not registered; log tail:\n{self.log_tail()}")
        return data[node_id]

    def queue_prompt(self, api_graph: dict, client_id: str | None = None, prompt_id: str | None = None) -> str:
        body = {"prompt": api_graph, "client_id": client_id or uuid.uuid4().hex}
        if prompt_id:
            body["prompt_id"] = prompt_id
        r = self._post("/prompt", body)
        data = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        if r.status_code != 200:
            err = data.get("error", r.text)
            raise PromptError(f"prompt rejected (HTTP {r.status_code}): {json.dumps(err)}\n"
                              f"node_errors: {json.dumps(data.get('node_errors', {}), indent=1)}",
                              node_errors=data.get("node_errors"))
        return data["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return self._get(f"/history/{prompt_id}").json().get(prompt_id)

    def wait_for(self, prompt_id: str, timeout: float = 60.0, check: bool = True, poll: float = 0.1) -> dict:
        """Poll /history until the prompt finished; return its entry.

        With check=True a failed or interrupted run raises PromptError with the error message and the log tail."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id)
            if entry is not None and entry.get("status", {}).get("completed") is not None:
                break
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}; log tail:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} not finished after {timeout} s; log tail:\n{self.log_tail()}")
            time.sleep(poll)
        if check and entry["status"].get("status_str") != "success":
            msgs = [m for m in entry["status"].get("messages", [])
                    if m[0] in ("execution_error", "execution_interrupted")]
            raise PromptError(f"prompt {prompt_id} ended {entry['status'].get('status_str')}: "
                              f"{json.dumps(msgs, indent=1)[:4000]}\nlog tail:\n{self.log_tail()}", entry=entry)
        return entry

    def run(self, api_graph: dict, timeout: float = 60.0, check: bool = True) -> dict:
        """queue_prompt + wait_for."""
        return self.wait_for(self.queue_prompt(api_graph), timeout=timeout, check=check)

    @staticmethod
    def output_images(entry: dict) -> list[dict]:
        """[{filename, subfolder, type}, ...] of every image a history entry lists."""
        return [img for out in entry.get("outputs", {}).values() for img in out.get("images", [])]

    def view(self, filename: str, subfolder: str = "", type: str = "output") -> bytes:
        return self._get("/view", filename=filename, subfolder=subfolder, type=type).content

    def interrupt(self, prompt_id: str | None = None) -> None:
        self._post("/interrupt", {"prompt_id": prompt_id} if prompt_id else {}).raise_for_status()

    def cancel_after_progress(self, api_graph: dict, node: str, what: str, wait: float = 120.0,
                              timeout: float = 60.0) -> tuple[str, list[tuple[str, dict]]]:
        """Queue `api_graph`, wait (up to `wait` s) for a progress event of `node`, press Cancel (/interrupt) and
        return (prompt id, the prompt's events) once it ended. `what` names the progress in the failure message."""
        with self.listen() as ws:
            pid = self.queue_prompt(api_graph, client_id=ws.client_id)
            deadline = time.monotonic() + wait
            while not any(t == "progress" and d.get("node") == node for t, d in ws.for_prompt(pid)):
                assert time.monotonic() < deadline, f"no {what} progress: {ws.for_prompt(pid)}\n{self.log_tail()}"
                time.sleep(0.02)
            self.interrupt(pid)
            return pid, ws.wait_done(pid, timeout=timeout)

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        """POST /free: sets flags that the prompt worker acts on when it is idle (asynchronous)."""
        self._post("/free", {"unload_models": unload_models, "free_memory": free_memory}).raise_for_status()

    def queue(self) -> dict:
        return self._get("/queue").json()

    def system_stats(self) -> dict:
        return self._get("/system_stats").json()

    def listen(self) -> "EventListener":
        """A connected websocket listener; pass its client_id to queue_prompt (events go only to that client)."""
        return EventListener(self)


class EventListener:
    """Collects websocket JSON events (and counts binary preview frames) on a background thread.

        with srv.listen() as ws:
            pid = srv.queue_prompt(graph, client_id=ws.client_id)
            events = ws.wait_done(pid, timeout=60)   # [(type, data), ...] for that prompt

    Order for one prompt: execution_start, execution_cached, then per node executing/progress/progress_state/
    executed, then execution_success | execution_error | execution_interrupted, and last
    executing {"node": None} (sent by main.py after the /history entry is written).
    """

    DONE = ("execution_success", "execution_error", "execution_interrupted")

    @staticmethod
    def _is_last(t: str, d: dict, prompt_id: str) -> bool:
        return t == "executing" and d.get("node") is None and d.get("prompt_id") == prompt_id

    def __init__(self, server: ComfyServer):
        import websocket  # websocket-client

        self.client_id = uuid.uuid4().hex
        self.events: list[tuple[str, dict]] = []
        self.binary_frames = 0
        self._cond = threading.Condition()
        self._ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={self.client_id}",
                                               timeout=10)
        self._ws.settimeout(0.5)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        import websocket

        while not self._stop.is_set():
            try:
                msg = self._ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except Exception:
                break
            with self._cond:
                if isinstance(msg, bytes):
                    self.binary_frames += 1
                else:
                    m = json.loads(msg)
                    self.events.append((m.get("type"), m.get("data") or {}))
                self._cond.notify_all()

    def for_prompt(self, prompt_id: str) -> list[tuple[str, dict]]:
        """Events of one prompt (events without a prompt_id, e.g. `progress` of older servers, are kept)."""
        with self._cond:
            return [(t, d) for t, d in self.events if t != "status" and d.get("prompt_id", prompt_id) == prompt_id]

    def wait_done(self, prompt_id: str, timeout: float = 60.0) -> list[tuple[str, dict]]:
        """Block until the final `executing` {node: None} of prompt_id; return its events."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not any(self._is_last(t, d, prompt_id) for t, d in self.events):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no end event for {prompt_id} within {timeout} s; got "
                                       f"{[t for t, _ in self.events]}")
                self._cond.wait(min(left, 0.5))
        return self.for_prompt(prompt_id)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        try:
            self._ws.close()
        except Exception:
            pass

    def __enter__(self) -> "EventListener":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_NODE_IDS_SCRIPT = r"""
import asyncio, importlib.util, json, sys
sys.path.insert(0, "."); from comfy.cli_args import args; args.cpu = True
pack = sys.argv[1]
spec = importlib.util.spec_from_file_location("newbie_pack_probe", pack + "/__init__.py",
                                              submodule_search_locations=[pack])
mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod; spec.loader.exec_module(mod)
if getattr(mod, "NODE_CLASS_MAPPINGS", None) is not None:
    print(json.dumps({"status": "v1_trap"})); sys.exit()
if not hasattr(mod, "comfy_entrypoint"):
    print(json.dumps({"status": "no_entrypoint"})); sys.exit()
async def main():
    ext = mod.comfy_entrypoint()
    ext = await ext if asyncio.iscoroutine(ext) else ext
    return [c.GET_SCHEMA().node_id for c in await ext.get_node_list()]
print(json.dumps({"status": "ok", "ids": asyncio.run(main())}))
"""


def pack_node_ids(comfy_dir: str | Path | None = None, pack_dir: str | Path = REPO_ROOT) -> dict:
    """Ask the pack itself (in a subprocess, as ComfyUI's loader would) which node ids it registers.

    Returns {"status": "ok", "ids": [...]} or {"status": "no_init" | "no_entrypoint" | "v1_trap"};
    raises RuntimeError with the traceback when the pack fails to import."""
    pack_dir = Path(pack_dir).resolve()
    if not (pack_dir / "__init__.py").is_file():
        return {"status": "no_init"}
    comfy_dir = Path(comfy_dir) if comfy_dir else find_comfyui()
    r = subprocess.run([sys.executable, "-c", _NODE_IDS_SCRIPT, str(pack_dir)], cwd=comfy_dir,
                       capture_output=True, text=True, timeout=120)
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"importing the pack failed (rc {r.returncode}):\n{r.stderr[-4000:]}")
    return json.loads(lines[-1])
