"""Reliability of the nodes inside (in-process) ComfyUI (issue #5): out of memory, NaN, cancel and bad files give
a clear error, leave no model loaded or tensor pinned, and the next call works."""
from __future__ import annotations

import gc
import json
import weakref
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from faults import call_at_dit_step, nan_in_stage, oom_at_dit_step, oom_in_vae_decode, track_tensors_read
from test_sampler import SIZE, conditioning


@pytest.fixture
def sample(pack, dit):
    """Call NewBieDiTSampler.execute (euler, guided every step: one DiT call per step)."""
    dm = dit.model.diffusion_model
    pos, neg = conditioning(dm, 6, seed=1), conditioning(dm, 1, seed=2)

    def run(model=dit, positive=pos, negative=neg, **kw):
        args = dict(seed=3, steps=5, cfg=3.0, shift=6.0, solver="euler", cfg_trunc=1.0, renorm=0.0, width=SIZE,
                    height=SIZE, batch_size=1)
        args.update(kw)
        return pack.nodes.sampler.NewBieDiTSampler.execute(model=model, positive=positive, negative=negative,
                                                          **args).args[0]["samples"]
    return run


def pack_models_loaded(mm) -> list:
    return [lm.model.newbie_label for lm in mm.current_loaded_models if hasattr(lm.model, "newbie_label")]


def test_oom_in_the_sampler_unloads_explains_and_the_next_run_matches(comfyui, pack, dit, sample, text_encoders):
    clean = sample()
    comfyui.mm.load_models_gpu([dit, text_encoders.gemma_patcher])  # something else loaded too
    with oom_at_dit_step(3, core=pack.newbie_core) as fault, pytest.raises(torch.OutOfMemoryError) as e:
        sample()
    msg = str(e.value)
    assert fault.fired == 1 and isinstance(e.value, pack.newbie_core.errors.StageOutOfMemoryError)
    assert msg.startswith("Out of memory in the DiT sampling stage on cpu; all models were released")
    assert "NewBie DiT Loader precision fp8_e4m3fn" in msg and "--lowvram" in msg and "NewBie Memory Purge" in msg
    assert pack_models_loaded(comfyui.mm) == [], "every model is unloaded after an out-of-memory"
    assert torch.equal(sample(), clean), "the next run is unaffected"


def test_cancel_in_the_sampler_frees_the_run(comfyui, pack, sample, monkeypatch):
    """ComfyUI's interrupt flag set during step 2: the cancel point after that step raises, no further DiT call
    runs, and (with the exception still held, as ComfyUI does while reporting) no latent of the run survives."""
    import comfy.utils

    mm = comfyui.mm
    # the server's progress hook (main.py hijack_progress) is the cancel point; in-process it must be installed
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK",
                        lambda value, total, preview, node_id=None: mm.throw_exception_if_processing_interrupted())
    refs = []
    real_cast = pack.newbie_core.sampling._time_vector

    def spy(t, x):  # every sampler state the run creates passes through here
        refs.append(weakref.ref(x))
        return real_cast(t, x)

    pack.newbie_core.sampling._time_vector = spy
    try:
        with call_at_dit_step(2, lambda: mm.interrupt_current_processing(True), core=pack.newbie_core) as f, \
                pytest.raises(mm.InterruptProcessingException) as e:
            sample(steps=9)
    finally:
        pack.newbie_core.sampling._time_vector = real_cast
        mm.interrupt_current_processing(False)
    assert f.fired == 1 and f.calls == 2, "stopped within the step the cancel arrived in"
    gc.collect()
    assert e.value is not None and refs and [r for r in refs if r() is not None] == []
    assert sample().shape == (1, 16, SIZE // 8, SIZE // 8)


def test_nan_in_fp16_names_the_stage_and_recommends_bf16(pack, loaders, sample):
    fp16 = loaders.dit(precision="fp16")
    with nan_in_stage("dit", core=pack.newbie_core), pytest.raises(pack.newbie_core.errors.NumericalError) as e:
        sample(model=fp16)
    assert "The DiT sampling stage produced NaN/inf values in fp16: fp16 overflows in this model family; use bf16" \
           in str(e.value)


def test_text_encoders_of_another_width_fail_before_loading_the_dit(comfyui, pack, sample, tmp_path):
    from newbie_core.tiny.dit import TINY_DIT_CONFIG, tiny_dit_state_dict

    core = pack.newbie_core
    path = tmp_path / "NewBie-other-width.safetensors"
    save_file(tiny_dit_state_dict(0, replace(TINY_DIT_CONFIG, cap_feat_dim=48)), str(path))
    other = pack.nodes._comfy.load_dit_patcher(path, core.precision.parse_precision("fp32"), "sdpa")
    dm = other.model.diffusion_model
    wrong = [[torch.zeros(1, 8, 64), {"attention_mask": torch.ones(1, 8, dtype=torch.long),
                                      "pooled_output": torch.zeros(1, dm.config.clip_text_dim)}]]
    with pytest.raises(core.errors.ModelFileError, match="prompt features are 64 wide, but this DiT expects 48"):
        sample(model=other, positive=wrong, negative=wrong)
    assert other.model.diffusion_model.config.cap_feat_dim == 48 and pack_models_loaded(comfyui.mm) == []


def test_vae_oom_even_in_tiles_unloads_and_explains(comfyui, pack, loaders):
    vae = loaders.vae(precision="fp32")
    samples = {"samples": torch.randn(1, 16, 4, 4)}
    with oom_in_vae_decode(1, tiles_too=True, core=pack.newbie_core), pytest.raises(torch.OutOfMemoryError) as e:
        pack.nodes.vae_decode.NewBieVAEDecode.execute(vae=vae, samples=samples, precision="auto", tiled=False)
    assert str(e.value).startswith("Out of memory in the VAE decode stage")
    assert "tiled on in NewBie VAE Decode" in str(e.value) and pack_models_loaded(comfyui.mm) == []
    out = pack.nodes.vae_decode.NewBieVAEDecode.execute(vae=vae, samples=samples, precision="auto", tiled=False)
    assert out.args[0].shape == (1, 32, 32, 3)


def test_long_prompt_note_and_a_single_cache_clear_per_encoding(pack, text_encoders, monkeypatch):
    node = pack.nodes.text_encode
    node.EMBEDDING_CACHE.clear()
    collects = []
    real = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: collects.append(1) or real(*a))
    long = "1girl, " * 300 + "zzz_last_tag"
    out = node.NewBieTextEncode.execute(text_encoders=text_encoders, positive=long, negative="lowres",
                                        system_prompt="tags", keep_loaded=False)
    note = out.ui.as_dict()["text"][0]
    assert len(collects) == 1, f"{len(collects)} garbage collections for one encoding (one per encoder before)"
    assert "\npositive: Gemma prompt is " in note and "tokens long; only the first 512 are used" in note
    assert "\npositive: Jina prompt is " in note and "negative:" not in note
    cached = node.NewBieTextEncode.execute(text_encoders=text_encoders, positive=long, negative="lowres",
                                           system_prompt="tags", keep_loaded=False).ui.as_dict()["text"][0]
    assert cached.startswith("2 of 2 prompts from cache") and "positive: Gemma prompt is" in cached
    assert len(collects) == 1, "a cache hit loads nothing and collects nothing"
    node.EMBEDDING_CACHE.clear()


def test_purge_reports_the_embedding_cache_and_keeps_it(pack, text_encoders):
    node = pack.nodes.text_encode
    node.EMBEDDING_CACHE.clear()
    node.NewBieTextEncode.execute(text_encoders=text_encoders, positive="a", negative="b", system_prompt="tags",
                                  keep_loaded=False)
    nbytes = node.EMBEDDING_CACHE.nbytes()
    assert len(node.EMBEDDING_CACHE) == 2 and nbytes > 0
    out = pack.nodes.memory_purge.NewBieMemoryPurge.execute(anything=None)
    report, text = json.loads(out.args[1]), out.ui.as_dict()["text"][0]
    assert report["embedding_cache"] == {"entries": 2, "mib": round(nbytes / 2**20, 2), "max_entries": 128}
    assert f"prompt-embedding cache (kept, RAM only): 2 of 128 prompts, {round(nbytes / 2**20, 2)} MiB" in text
    assert len(node.EMBEDDING_CACHE) == 2, "the purge keeps the cache (RAM only; the next run skips the encoders)"
    node.EMBEDDING_CACHE.clear()


def test_dit_loader_missing_file_lists_close_matches(pack, comfy_models):
    with pytest.raises(pack.newbie_core.errors.ModelFileError) as e:
        pack.nodes.loaders.NewBieDiTLoader.execute(dit_name="newbie-image-exp0.1.safetensors", precision="bf16",
                                                   attention="sdpa", compile=False, device="default")
    msg = str(e.value)
    assert "'newbie-image-exp0.1.safetensors' was not found in the ComfyUI 'diffusion_models' folder(s)" in msg
    assert f"Close matches: '{comfy_models['dit']}'." in msg and "refresh (R)" in msg


def test_dit_loader_that_fails_part_way_leaves_nothing_in_memory(pack, comfy_models):
    with track_tensors_read(fail_after=4, core=pack.newbie_core) as read, \
            pytest.raises(pack.newbie_core.errors.ModelFileError, match="is damaged") as e:
        pack.nodes.loaders.NewBieDiTLoader.execute(dit_name=comfy_models["dit"], precision="bf16", attention="sdpa",
                                                   compile=False, device="default")
    gc.collect()
    assert len(read) == 4 and e.value is not None and [r for r in read if r() is not None] == []
