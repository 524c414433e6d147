"""Reliability of the staged pipeline (issue #5): bad inputs and faults give a clear error, release everything the
run held, and leave the pipeline ready for the next run; same seed → same latents; no memory growth."""
from __future__ import annotations

import ctypes
import gc
import weakref
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from faults import call_at_dit_step, nan_in_stage, oom_at_dit_step, oom_in_vae_decode
from newbie_core import recovery
from newbie_core.cli import main as cli_main
from newbie_core.dit import NextDiT
from newbie_core.errors import InputError, InterruptedByUser, ModelFileError, NumericalError, StageOutOfMemoryError
from newbie_core.memory import rss_bytes
from newbie_core.model_paths import ModelPaths
from newbie_core.pipeline import GenerationSettings, Pipeline
from newbie_core.sizes import nearest_valid_size, validate_size
from newbie_core.tiny.dit import TINY_DIT_CONFIG, tiny_dit_state_dict

FP32 = {"dit": "fp32", "text": "fp32", "vae": "fp32"}
SMALL = dict(width=64, height=48, steps=4, solver="euler", cfg=4.0, cfg_trunc=1.0)  # euler: 1 DiT call per step


@pytest.fixture
def pipe(tiny_models):
    return Pipeline(ModelPaths.from_dir(tiny_models["root"]), device="cpu", precision=dict(FP32))


def all_idle(p: Pipeline) -> bool:
    return all(m["device"] == "cpu" and "idle" in m["precision"] for m in p.describe_models())


# ------------------------------------------------------------------------------------------ sizes
def test_one_rounding_rule_for_every_size_message(tiny_models):
    """validate_size (sampler, pipeline) and NextDiT.check_size (DiT) suggest the same size; ties go down."""
    assert [nearest_valid_size(v) for v in (1000, 72, 8, 1020, 1030, 25)] == [992, 64, 16, 1024, 1024, 32]
    dit = NextDiT(TINY_DIT_CONFIG, device="meta")
    for px in range(8, 700, 8):
        if px % 16 == 0:
            continue
        with pytest.raises(InputError) as a:
            validate_size(px, 64)
        with pytest.raises(InputError) as b:
            dit.check_size(px // 8, 8)
        near = nearest_valid_size(px)
        assert f"Nearest valid size: {near}×64" in str(a.value) and f"use {near} px" in str(b.value)


def test_size_beyond_the_position_table_is_refused_and_the_pipeline_recovers(pipe):
    with pytest.raises(InputError, match=r"width 8192 px .* at most 8176 px"):
        pipe.generate("x", settings=GenerationSettings(**{**SMALL, "width": 8192, "height": 64}))
    assert all_idle(pipe)
    assert pipe.generate("x", settings=GenerationSettings(seed=1, **SMALL)).images.shape == (1, 3, 48, 64)


# ------------------------------------------------------------------------------------------ prompts
def test_empty_positive_prompt_works(pipe):
    """Official empty-prompt behaviour: Gemma sees only <bos> (no system prompt), the picture is finite."""
    cond, uncond = pipe.encode(["", ""])
    assert cond.cap_lens == [1] and uncond.cap_lens == [1]
    res = pipe.generate("", "", settings=GenerationSettings(seed=2, **SMALL))
    assert torch.isfinite(res.images).all() and torch.isfinite(res.latents).all()


def test_too_long_prompt_notes_count_and_cut_point_also_from_the_cache(pipe):
    text = "1girl, " * 300 + "zzz_last_tag"
    first = pipe.encode([text])[0]
    (note_gemma, note_jina) = first.notes
    assert note_gemma.startswith("Gemma prompt is ") and "tokens long; only the first 512 are used" in note_gemma
    assert "It was cut after: \"…" in note_gemma and "1girl" in note_gemma and "zzz_last_tag" not in note_gemma
    assert note_jina.startswith("Jina prompt is ")
    again = pipe.encode([text])[0]
    assert pipe.cache.hits >= 1 and again.notes == first.notes
    assert pipe.encode(["short"])[0].notes == ()


# ------------------------------------------------------------------------------------------ wrong encoders
@pytest.mark.parametrize("field,wide,msg", [
    ("cap_feat_dim", 48, "The prompt features are 64 wide, but this DiT expects 48"),
    ("clip_text_dim", 16, "The pooled text vector is 32 wide, but this DiT expects 16"),
])
def test_text_encoders_of_another_width_are_named_at_sampling(tiny_models, tmp_path, field, wide, msg):
    config = replace(TINY_DIT_CONFIG, **{field: wide})
    path = tmp_path / "NewBie-other-width.safetensors"
    save_file(tiny_dit_state_dict(0, config), str(path))
    paths = ModelPaths.from_dir(tiny_models["root"])
    paths.dit = path
    p = Pipeline(paths, device="cpu", precision=dict(FP32))
    with pytest.raises(ModelFileError) as e:
        p.generate("x", settings=GenerationSettings(seed=1, **SMALL))
    assert msg in str(e.value) and "not belong to this DiT" in str(e.value)
    assert all_idle(p)


# ------------------------------------------------------------------------------------------ NaN / inf
@pytest.mark.parametrize("stage,precision,named", [
    ("dit", {"dit": "fp16"}, "The DiT sampling stage produced NaN/inf values in fp16: fp16 overflows in this model "
                             "family; use bf16 (or fp32)"),
    ("vae", {"vae": "bf16"}, "The VAE decode stage produced NaN/inf values in bf16"),
    ("text", {"text": "fp16"}, "The text (Gemma) stage produced NaN/inf values in fp16"),
])
def test_nan_names_the_stage_and_a_safer_precision(tiny_models, stage, precision, named):
    p = Pipeline(ModelPaths.from_dir(tiny_models["root"]), device="cpu", precision={**FP32, **precision})
    with nan_in_stage(stage) as fault, pytest.raises(NumericalError) as e:
        p.generate(f"nan in {stage}", settings=GenerationSettings(seed=1, **SMALL))
    assert fault.fired >= 1 and named in str(e.value) and "Nothing was saved" in str(e.value)
    assert all_idle(p)


def test_cli_saves_no_image_when_a_stage_gives_nan(tiny_models, tmp_path, capsys):
    out = tmp_path / "black.png"
    with nan_in_stage("dit"):
        rc = cli_main(["generate", "--prompt", "x", "--out", str(out), "--model-dir", str(tiny_models["root"]),
                       "--width", "32", "--height", "32", "--steps", "3", "--device", "cpu",
                       "--precision", "dit=fp16,text=fp32,vae=fp32"])
    err = capsys.readouterr().err
    assert rc == 2 and "DiT sampling stage produced NaN/inf values in fp16" in err and "Traceback" not in err
    assert not out.exists(), "no image may be written after NaN"


# ------------------------------------------------------------------------------------------ out of memory
def _latent_refs():
    """A sampler callback keeping weak references to every latent state it sees."""
    refs = []
    return refs, lambda info: refs.append(weakref.ref(info.x))


def test_oom_in_the_dit_frees_everything_and_the_next_run_matches_a_clean_one(pipe, monkeypatch):
    settings = GenerationSettings(seed=4, **SMALL)
    clean = pipe.generate("oom", settings=settings).latents
    pipe.precision_names["dit"] = "bf16"  # a device copy that differs from the kept fp32 weights
    cleared = []
    real_clear = recovery.empty_device_cache
    monkeypatch.setattr(recovery, "empty_device_cache", lambda d=None: cleared.append(d) or real_clear(d))
    refs, on_step = _latent_refs()
    with oom_at_dit_step(3) as fault, pytest.raises(StageOutOfMemoryError) as e:
        pipe.generate("oom", settings=settings, callback=on_step)
    msg = str(e.value)
    assert fault.fired == 1 and len(refs) == 2, "steps 1 and 2 ran, step 3 ran out of memory"
    assert "Out of memory in the DiT sampling stage on cpu; all models were released" in msg
    assert "fp8_e4m3fn DiT precision (--precision dit=fp8_e4m3fn" in msg and "--lowvram" in msg
    assert isinstance(e.value, torch.OutOfMemoryError), "hosts' own OOM handling must still see an OOM"
    gc.collect()
    assert cleared, "the device cache is emptied after the failure"
    assert all_idle(pipe) and [r for r in refs if r() is not None] == [], "the run's latents are still alive"
    pipe.precision_names["dit"] = "fp32"
    assert torch.equal(pipe.generate("oom", settings=settings).latents, clean)


def test_oom_in_vae_decode_retries_in_tiles_and_says_so(pipe):
    settings = GenerationSettings(seed=5, **SMALL)
    clean = pipe.generate("vae", settings=settings)
    with oom_in_vae_decode(first_n_calls=1) as fault:
        res = pipe.generate("vae", settings=settings)
    assert fault.fired == 1 and res.notes == ["out of memory in full decode: decoded in tiles instead"]
    assert "decoded in tiles" in pipe.ledger.table()
    assert res.images.shape == clean.images.shape and (res.images - clean.images).abs().mean() < 0.05


def test_oom_even_in_tiles_explains_the_options(pipe):
    with oom_in_vae_decode(first_n_calls=1, tiles_too=True), pytest.raises(StageOutOfMemoryError) as e:
        pipe.generate("vae", settings=GenerationSettings(seed=5, **SMALL))
    assert "Out of memory in the VAE decode stage" in str(e.value) and "--tiled-decode" in str(e.value)
    assert all_idle(pipe)


# ------------------------------------------------------------------------------------------ cancel
def test_cancel_stops_within_one_step_frees_the_run_and_the_next_run_works(pipe):
    settings = GenerationSettings(seed=6, **{**SMALL, "steps": 8})
    clean = pipe.generate("cancel", settings=settings).latents
    pipe.precision_names["dit"] = "bf16"
    refs, keep = _latent_refs()

    def cancel_at_step_2(info):
        keep(info)
        if info.step == 2:
            raise InterruptedByUser("cancelled")

    with call_at_dit_step(10**9, lambda: None) as calls, pytest.raises(InterruptedByUser) as e:
        pipe.generate("cancel", settings=settings, callback=cancel_at_step_2)
    assert calls.calls == 3, "the step in progress finishes, no further DiT call runs"
    gc.collect()  # the exception is still held (as a host does while it reports it): its frames must not pin tensors
    assert e.value is not None and all_idle(pipe) and [r for r in refs if r() is not None] == []
    pipe.precision_names["dit"] = "fp32"
    assert torch.equal(pipe.generate("cancel", settings=settings).latents, clean)


# ------------------------------------------------------------------------------------------ determinism
def test_same_seed_and_settings_give_bitwise_identical_latents_on_cpu(tiny_models):
    settings = GenerationSettings(seed=123, **{**SMALL, "solver": "midpoint", "cfg_trunc": 0.5})
    runs = []
    for _ in range(2):  # two independent pipelines: nothing shared but the files
        p = Pipeline(ModelPaths.from_dir(tiny_models["root"]), device="cpu", precision={"dit": "bf16", "text": "fp32",
                                                                                       "vae": "fp32"})
        runs.append(p.generate("1girl, smile", "lowres", settings=settings))
    assert torch.equal(runs[0].latents, runs[1].latents) and torch.equal(runs[0].images, runs[1].images)


CUDA_TOLERANCE = 1e-3  # README "Troubleshooting → Reproducibility": max |Δ| of scaled latents, same GPU, two runs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only (the documented GPU tolerance)")
def test_same_seed_on_cuda_is_within_the_documented_tolerance(tiny_models):
    settings = GenerationSettings(seed=123, **{**SMALL, "solver": "midpoint"})
    p = Pipeline(ModelPaths.from_dir(tiny_models["root"]), device="cuda", precision={"dit": "bf16", "text": "bf16"})
    a, b = (p.generate("1girl, smile", "lowres", settings=settings).latents for _ in range(2))
    assert (a - b).abs().max().item() <= CUDA_TOLERANCE


# ------------------------------------------------------------------------------------------ memory growth
def _trim() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise, which is allocator
    noise, not a leak); no-op where malloc_trim does not exist."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def test_twenty_generations_grow_rss_by_less_than_50_mb(pipe):
    """Warm up (first loads, allocator pools, lazy imports), then 20 generations with new prompts (the text
    encoders run every time) and new seeds: resident memory may grow by at most 50 MB."""
    settings = GenerationSettings(**SMALL)
    for i in range(3):
        pipe.generate(f"warm-up {i}", settings=replace(settings, seed=i))
    _trim()
    before = rss_bytes()
    for i in range(20):
        res = pipe.generate(f"prompt number {i}, 1girl", "lowres", settings=replace(settings, seed=100 + i))
        assert torch.isfinite(res.images).all()
    del res
    _trim()
    growth = (rss_bytes() - before) / 2**20
    assert growth <= 50, f"RSS grew by {growth:.1f} MB over 20 generations"
