"""Reliability through a real ComfyUI server (issue #5): faults inside the server process (out of memory in the DiT
and in VAE decode, NaN in fp16, a real POST /interrupt at a known step), bad inputs, and a queue of 10 mixed prompts.
Every failure must come back as an execution_error with our message, leave no model loaded or latent alive, and the
server must run the next prompt.

One server for this module, started with the test-only fault pack (tests/integration/fault_pack: routes that arm
tests/faults.py in the server process) next to the pack under test; the product itself has no test hooks.
"""
from __future__ import annotations

import io
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from comfy_server import ComfyServer

FAULT_PACK = Path(__file__).resolve().parent / "fault_pack"
DIT, GEMMA, JINA, VAE = ("NewBie-Image-Exp0.1.safetensors", "gemma_3_4b_it_bf16.safetensors",
                         "jina_clip_v2_bf16.safetensors", "ae.safetensors")


@pytest.fixture(scope="module")
def srv(comfy_dir, comfy_tiny_files):
    server = ComfyServer(comfy_dir)
    (server.base / "custom_nodes" / "newbie_fault_pack").symlink_to(FAULT_PACK, target_is_directory=True)
    server.place_models(comfy_tiny_files)
    try:
        server.start()
        assert server.http.get(server.url + "/newbie_test/state", timeout=30).status_code == 200, server.log_tail()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def fault(srv):
    """arm(spec) → arms a fault in the server; disarmed after the test whatever happens."""
    def arm(spec: dict) -> None:
        r = srv.http.post(srv.url + "/newbie_test/arm", json=spec, timeout=30)
        assert r.status_code == 200, r.text
    yield arm
    srv.http.post(srv.url + "/newbie_test/disarm", json={}, timeout=30)


def state(srv: ComfyServer, latent_hw: tuple[int, int] | None = None) -> dict:
    """The fault pack's view of the server: fired faults, pack models ComfyUI holds, CUDA bytes, live latents."""
    s = srv.http.get(srv.url + "/newbie_test/state", timeout=60).json()
    if latent_hw is not None:
        s["live_latents"] = [sh for sh in s["live_latents"] if tuple(sh[-2:]) == latent_hw]
    return s


def graph(positive: str, seed: int = 0, width: int = 64, height: int = 64, steps: int = 3, solver: str = "euler",
          dit_precision: str = "fp32", te_precision: str = "fp32", vae_precision: str = "fp32", negative: str = "lowres",
          dit_name: str = DIT, vae_name: str = VAE, prefix: str | None = None) -> dict:
    """Loaders → Text Encode ("4") → Sampler ("5") → VAE Decode ("6") → SaveImage ("7") + SaveLatent ("8")."""
    prefix = prefix or f"rel_{uuid.uuid4().hex[:8]}"
    return {
        "1": {"class_type": "NewBieDiTLoader", "inputs": {"dit_name": dit_name, "precision": dit_precision,
                                                          "attention": "auto", "compile": False, "device": "default"}},
        "2": {"class_type": "NewBieTextEncoderLoader", "inputs": {"gemma_name": GEMMA, "jina_name": JINA,
                                                                  "precision": te_precision, "device": "default"}},
        "3": {"class_type": "NewBieVAELoader", "inputs": {"vae_name": vae_name, "precision": vae_precision,
                                                          "device": "default"}},
        "4": {"class_type": "NewBieTextEncode", "inputs": {"text_encoders": ["2", 0], "positive": positive,
                                                           "negative": negative, "system_prompt": "auto",
                                                           "keep_loaded": False}},
        "5": {"class_type": "NewBieDiTSampler", "inputs": {
            "model": ["1", 0], "positive": ["4", 0], "negative": ["4", 1], "seed": seed, "steps": steps, "cfg": 4.0,
            "shift": 6.0, "solver": solver, "cfg_trunc": 1.0, "renorm": 0.0, "width": width, "height": height,
            "batch_size": 1}},
        "6": {"class_type": "NewBieVAEDecode", "inputs": {"vae": ["3", 0], "samples": ["5", 0], "precision": "auto",
                                                          "tiled": False}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"latents/{prefix}"}},
    }


def error_of(entry: dict) -> dict:
    assert entry["status"]["status_str"] == "error", entry["status"]
    (err,) = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    return err


def outputs_of(srv: ComfyServer, entry: dict) -> tuple[torch.Tensor, np.ndarray]:
    """(latent saved by SaveLatent, pixels of the PNG saved by SaveImage) of a finished prompt."""
    (lat,) = entry["outputs"]["8"]["latents"]
    latent = load_file(str(srv.base / "output" / lat["subfolder"] / lat["filename"]))["latent_tensor"]
    (img,) = srv.output_images(entry)
    return latent, np.asarray(Image.open(io.BytesIO(srv.view(**img))))


def saved_files(srv: ComfyServer, prefix: str) -> list[Path]:
    return sorted((srv.base / "output").rglob(f"{prefix}*"))


# ------------------------------------------------------------------------------------------ faults
def test_oom_in_the_dit_unloads_models_explains_and_the_next_prompt_runs(srv, fault):
    srv.run(graph("warm the models up", seed=1), timeout=120)
    fault({"fault": "oom_dit", "step": 2})
    entry = srv.run(graph(f"oom {uuid.uuid4().hex}", seed=2), timeout=120, check=False)
    err = error_of(entry)
    assert err["node_type"] == "NewBieDiTSampler" and err["exception_type"].endswith("StageOutOfMemoryError")
    msg = err["exception_message"]
    assert "Out of memory in the DiT sampling stage on cpu; all models were released" in msg
    assert "NewBie DiT Loader precision fp8_e4m3fn" in msg and "--lowvram" in msg, msg
    s = state(srv)
    assert s["fired"] == [1] and s["loaded"] == [], s
    srv.http.post(srv.url + "/newbie_test/disarm", json={}, timeout=30)
    entry = srv.run(graph(f"after oom {uuid.uuid4().hex}", seed=3), timeout=120)
    assert len(srv.output_images(entry)) == 1


def test_oom_in_vae_decode_retries_in_tiles_and_the_node_says_so(srv, fault):
    fault({"fault": "oom_vae", "calls": 1})
    entry = srv.run(graph(f"vae oom {uuid.uuid4().hex}", seed=4), timeout=120)
    assert state(srv)["fired"] == [1]
    note = entry["outputs"]["6"]["text"][0]
    assert "out of memory → decoded in tiles" in note, note
    assert len(srv.output_images(entry)) == 1


def test_nan_in_fp16_names_the_stage_recommends_bf16_and_saves_no_image(srv, fault):
    fault({"fault": "nan", "stage": "dit"})
    g = graph(f"nan {uuid.uuid4().hex}", seed=5, dit_precision="fp16")
    prefix = g["7"]["inputs"]["filename_prefix"]
    err = error_of(srv.run(g, timeout=120, check=False))
    assert err["node_type"] == "NewBieDiTSampler" and err["exception_type"].endswith("NumericalError")
    assert "The DiT sampling stage produced NaN/inf values in fp16: fp16 overflows in this model family; use bf16" \
           in err["exception_message"]
    assert saved_files(srv, prefix) == [], "no (black) image or latent may be saved"


def test_post_interrupt_mid_sampling_stops_within_one_step_frees_the_run_and_the_next_prompt_runs(srv, fault):
    size, hw = 96, (12, 12)  # a latent size no other test uses, to find the run's tensors
    before = state(srv, hw)
    assert before["live_latents"] == [], before
    fault({"fault": "interrupt_dit", "step": 3})  # a real POST /interrupt while DiT call 3 (of 19) runs
    with srv.listen() as ws:
        pid = srv.queue_prompt(graph(f"cancel {uuid.uuid4().hex}", seed=6, width=size, height=size, steps=20),
                               client_id=ws.client_id)
        events = ws.wait_done(pid, timeout=120)
    types = [t for t, _ in events]
    assert "execution_interrupted" in types and "execution_success" not in types, types
    after = state(srv, hw)
    assert after["fired"] == [1] and after["calls"] == [3], f"the DiT ran on after the cancel: {after}"
    ticks = [d["value"] for t, d in events if t == "progress" and d.get("node") == "5"]
    assert ticks == [1, 2], f"progress after the cancel: {ticks}"
    assert after["live_latents"] == [], "the cancelled run's latents are still in memory"
    if before["cuda_allocated"] is not None:
        assert after["cuda_allocated"] <= before["cuda_allocated"] + 2**20, (before, after)
    srv.http.post(srv.url + "/newbie_test/disarm", json={}, timeout=30)
    assert len(srv.output_images(srv.run(graph(f"after cancel {uuid.uuid4().hex}", seed=7), timeout=120))) == 1


# ------------------------------------------------------------------------------------------ bad inputs
@pytest.fixture(scope="module")
def bad_files(srv, comfy_tiny_files, tmp_path_factory):
    """Wrong and damaged model files placed where users put them."""
    from faults import malicious_pth, truncated_copy
    from newbie_core.tiny.dit import TINY_DIT_CONFIG, tiny_dit_state_dict

    d = tmp_path_factory.mktemp("bad_files")
    dit_src = comfy_tiny_files[f"diffusion_models/{DIT}"]
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2),
               "model.diffusion_model.label_emb.0.0.weight": torch.zeros(2, 2)}, str(d / "sdxl.safetensors"))
    from dataclasses import replace
    save_file(tiny_dit_state_dict(0, replace(TINY_DIT_CONFIG, cap_feat_dim=48)), str(d / "wide.safetensors"))
    marker = d / "pwned.txt"
    srv.place_models({
        "diffusion_models/NewBie-truncated.safetensors": truncated_copy(dit_src, d / "trunc.safetensors", 0.5),
        "diffusion_models/sdxl_base_1.0.safetensors": d / "sdxl.safetensors",
        "diffusion_models/NewBie-other-width.safetensors": d / "wide.safetensors",
        "vae/gemma_in_vae.safetensors": comfy_tiny_files[f"text_encoders/{GEMMA}"],
        "vae/evil.pth": malicious_pth(d / "evil.pth", marker),
    })
    return marker


BAD = {  # case → (graph overrides, failing node, message fragments)
    "missing_dit": ({"dit_name": "newbie-image-exp0.1.safetensors"}, "NewBieDiTLoader",
                    ["'newbie-image-exp0.1.safetensors' was not found in the ComfyUI 'diffusion_models' folder(s)",
                     f"Close matches: '{DIT}'"]),
    "truncated_dit": ({"dit_name": "NewBie-truncated.safetensors"}, "NewBieDiTLoader",
                      ["NewBie-truncated.safetensors is damaged: it is truncated", "Re-download it"]),
    "sdxl_as_dit": ({"dit_name": "sdxl_base_1.0.safetensors"}, "NewBieDiTLoader",
                    ["is not a NewBie-image DiT: it looks like an SDXL UNet checkpoint", "Expected NewBie-Image-Exp0.1"]),
    "gemma_as_vae": ({"vae_name": "gemma_in_vae.safetensors"}, "NewBieVAELoader",
                     ["is not a FLUX VAE: it looks like a Gemma-3 text model", "Expected ae.safetensors"]),
    "pickle_vae": ({"vae_name": "evil.pth"}, "NewBieVAELoader", ["is a pickle checkpoint that needs code to load", "It was refused and nothing in it was run"]),
    "encoder_width": ({"dit_name": "NewBie-other-width.safetensors"}, "NewBieDiTSampler",
                      ["The prompt features are 64 wide, but this DiT expects 48", "do not belong to this DiT"]),
    "size_not_16": ({"width": 1000}, "NewBieDiTSampler", ["width 1000", "Nearest valid size: 992×64"]),
    "malformed_xml": ({"positive": "<character_1>\n<n>miku</n>\n<gender>1girl</gender>\n"}, "NewBieTextEncode",
                      ["XML prompt error at line 1, column 1", "<character_1> is never closed"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_gives_a_clear_error_and_the_server_keeps_running(srv, bad_files, case):
    overrides, node_type, fragments = BAD[case]
    kw = {"positive": f"{case} {uuid.uuid4().hex}", "seed": 8, **overrides}
    g = graph(**kw)
    err = error_of(srv.run(g, timeout=120, check=False))
    assert err["node_type"] == node_type, err
    for frag in fragments:
        assert frag in err["exception_message"], err["exception_message"]
    pngs = [f for f in saved_files(srv, g["7"]["inputs"]["filename_prefix"]) if f.suffix == ".png"]
    assert pngs == [], "no image may be saved from a failed run"
    assert srv.proc.poll() is None, "the server died"
    assert not bad_files.exists(), "code from a model file ran in the server"


def test_after_every_failure_the_server_runs_prompts_and_the_queue_is_empty(srv):
    entry = srv.run(graph(f"still alive {uuid.uuid4().hex}", seed=9), timeout=120)
    assert len(srv.output_images(entry)) == 1
    assert srv.queue() == {"queue_running": [], "queue_pending": []}


def test_empty_and_too_long_prompts_through_the_server(srv):
    entry = srv.run(graph("", negative="", seed=10), timeout=120)
    assert entry["outputs"]["4"]["text"][0].endswith("Gemma tokens: [1, 1]")
    latent, pixels = outputs_of(srv, entry)
    assert torch.isfinite(latent).all() and pixels.shape == (64, 64, 3)
    long = "1girl, " * 300 + "zzz_last_tag"
    note = srv.run(graph(long, seed=11), timeout=120)["outputs"]["4"]["text"][0]
    assert "\npositive: Gemma prompt is " in note and "tokens long; only the first 512 are used" in note, note
    assert "It was cut after: \"…" in note


# ------------------------------------------------------------------------------------------ queue of 10
QUEUE = [  # (width, height, solver, dit, text encoders, vae precision)
    (64, 64, "euler", "fp32", "fp32", "fp32"), (80, 64, "midpoint", "bf16", "fp32", "fp32"),
    (64, 96, "euler", "fp16", "bf16", "fp32"), (96, 96, "dpmpp_2m", "fp32", "bf16", "bf16"),
    (128, 64, "euler", "bf16", "fp32", "bf16"), (64, 64, "midpoint", "fp16", "fp32", "fp32"),
    (112, 80, "euler", "fp32", "fp32", "fp32"), (64, 128, "dpmpp_2m", "bf16", "bf16", "fp32"),
    (96, 64, "euler", "fp16", "fp32", "bf16"), (80, 80, "midpoint", "fp32", "bf16", "fp32"),
]


def _queue_graph(i: int) -> dict:
    w, h, solver, dit, te, vae = QUEUE[i]
    return graph(f"queue prompt {i}, 1girl", seed=1000 + i, width=w, height=h, solver=solver, dit_precision=dit,
                 te_precision=te, vae_precision=vae)


def test_a_queue_of_ten_mixed_prompts_completes_and_matches_single_runs(srv):
    singles = [outputs_of(srv, srv.run(_queue_graph(i), timeout=120)) for i in range(len(QUEUE))]
    with srv.listen() as ws:
        pids = [srv.queue_prompt(_queue_graph(i), client_id=ws.client_id) for i in range(len(QUEUE))]
        assert len(srv.queue()["queue_pending"]) + len(srv.queue()["queue_running"]) >= 2, "queued all at once"
        events = [ws.wait_done(pid, timeout=300) for pid in pids]
    for i, (pid, evs) in enumerate(zip(pids, events)):
        ran = {d["node"] for t, d in evs if t == "executing" and d.get("node")}
        assert "5" in ran and "6" in ran, f"prompt {i}: the sampler/decode did not run again ({ran})"
        latent, pixels = outputs_of(srv, srv.wait_for(pid, timeout=10))
        w, h = QUEUE[i][:2]
        assert latent.shape == (1, 16, h // 8, w // 8) and pixels.shape == (h, w, 3)
        assert torch.equal(latent, singles[i][0]), f"prompt {i} {QUEUE[i]}: latent differs from its single run"
        assert np.array_equal(pixels, singles[i][1]), f"prompt {i} {QUEUE[i]}: image differs from its single run"
    assert srv.queue() == {"queue_running": [], "queue_pending": []}
