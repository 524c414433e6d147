"""Hostile input through a real ComfyUI server (issue 15): model names POSTed to /prompt that leave the model
folders are refused and nothing outside is opened (spied in the server process by the test-only fault pack); a
prompt built to make the old XML regex backtrack does not stall the server; a replaced encoder file changes the
output of the same re-queued prompt."""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid
from pathlib import Path

import pytest

from comfy_server import ComfyServer
from test_reliability_server import DIT, FAULT_PACK, GEMMA, JINA, VAE, error_of, graph


@pytest.fixture(scope="module")
def srv(comfy_dir, comfy_tiny_files, tmp_path_factory):
    server = ComfyServer(comfy_dir)
    (server.base / "custom_nodes" / "newbie_fault_pack").symlink_to(FAULT_PACK, target_is_directory=True)
    server.place_models(comfy_tiny_files)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def spy(srv):
    """Arm the open() spy in the server; yields a function returning the paths opened since."""
    r = srv.http.post(srv.url + "/newbie_test/arm", json={"fault": "spy_open"}, timeout=30)
    assert r.status_code == 200, r.text
    yield lambda: srv.http.get(srv.url + "/newbie_test/state", timeout=60).json()["opened"]
    srv.http.post(srv.url + "/newbie_test/disarm", json={}, timeout=30)


def test_traversal_names_via_post_prompt_are_refused(srv, spy, comfy_tiny_files, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    for rel, src in comfy_tiny_files.items():
        shutil.copy(src, outside / Path(rel).name)
    (outside / "config.json").write_text('{"_class_name": "SECRET-MARKER"}')
    link = srv.base / "models" / "vae" / "evil.safetensors"
    link.symlink_to(outside / VAE)
    rel = os.path.relpath(outside, srv.base / "models" / "vae")  # same depth for diffusion_models
    names = [str(outside / VAE),            # absolute
             f"{rel}/{VAE}",                # ../ chain
             f"{rel}/",                     # trailing-slash folder that escapes (holds a config.json)
             "evil.safetensors"]            # a symlink out
    try:
        for name in names:
            for node in ("dit", "vae"):
                g = graph(f"trav {uuid.uuid4().hex}", **({"dit_name": name} if node == "dit" else {"vae_name": name}))
                msg = error_of(srv.run(g, timeout=120, check=False))["exception_message"]
                assert "refused" in msg or ("not found" in msg and node == "dit" and name == "evil.safetensors"), msg
                assert "SECRET" not in msg
        opened = spy()
        assert not [p for p in opened if str(outside) in p], opened
    finally:
        link.unlink()


def test_hostile_streaming_values_via_post_prompt_are_refused_naming_the_input(srv):
    """The DiT loader's streaming inputs as any HTTP client can send them: refused by ComfyUI's validation or
    the pack's checks with the input named, and the server runs the next prompt."""
    cases = [({"streaming": "../../etc/passwd"}, "streaming"), ({"streaming": "on; rm -rf /"}, "streaming"),
             ({"stream_vram_gb": float("nan")}, "stream_vram_gb"), ({"stream_vram_gb": 1e300}, "stream_vram_gb"),
             ({"stream_vram_gb": -1.0}, "stream_vram_gb")]
    for inputs, named in cases:
        g = graph(f"stream {uuid.uuid4().hex}")
        g["1"]["inputs"].update(inputs)
        # raw JSON: a client may send NaN (Python's json writes and ComfyUI's reads it; requests refuses to)
        r = srv.http.post(srv.url + "/prompt", data=json.dumps({"prompt": g, "client_id": uuid.uuid4().hex}),
                          headers={"Content-Type": "application/json"}, timeout=60)
        if r.status_code != 200:  # ComfyUI's own validation refused it before it ran
            msg = r.text
        else:
            msg = error_of(srv.wait_for(r.json()["prompt_id"], timeout=120, check=False))["exception_message"]
        assert named in msg, (inputs, msg)
    ok = graph(f"stream ok {uuid.uuid4().hex}")
    ok["1"]["inputs"].update(streaming="on", stream_vram_gb=0.25)
    ok["5"]["inputs"]["keep_loaded"] = True
    assert srv.run(ok, timeout=120)["status"]["status_str"] == "success"


def test_backtracking_prompt_does_not_stall_the_server(srv):
    prompt = "<a>b</a> <c" + " " * 3000 + "<d>" * 2000
    answered: list[float] = []

    def poll():
        for _ in range(20):
            t0 = time.perf_counter()
            srv.system_stats()
            answered.append(time.perf_counter() - t0)
            time.sleep(0.05)
    t = threading.Thread(target=poll)
    t0 = time.perf_counter()
    t.start()
    entry = srv.run(graph(prompt, seed=1), timeout=120, check=False)
    t.join()
    assert time.perf_counter() - t0 < 60
    assert entry["status"]["status_str"] in ("success", "error")
    assert max(answered) < 5.0, answered


def test_replaced_encoder_file_changes_the_output_after_requeue(srv, tmp_path):
    from newbie_core.tiny import make_tiny

    g = graph("1girl, replaced file", seed=5)
    first = srv.run(g, timeout=120)
    make_tiny(tmp_path / "other", seed=23)
    srv.place_models({f"text_encoders/{GEMMA}": tmp_path / "other" / "comfyui" / "text_encoders" / GEMMA})
    g2 = graph("1girl, replaced file", seed=5, prefix="after_replace")
    second = srv.run(g2, timeout=120)
    img1, img2 = (srv.output_images(e)[0] for e in (first, second))
    assert srv.view(img1["filename"], img1["subfolder"]) != srv.view(img2["filename"], img2["subfolder"])
    assert {DIT, JINA}  # the other files are unchanged
