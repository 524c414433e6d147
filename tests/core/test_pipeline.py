"""The staged pipeline: stage order, releasing models, the embedding cache, seeds, errors."""
import gc
import weakref

import pytest
import torch

from newbie_core.errors import InputError, StageOutOfMemoryError
from newbie_core.model_paths import ModelPaths
from newbie_core.pipeline import GenerationSettings, Pipeline

SMALL = dict(width=64, height=48, steps=4, solver="euler", cfg=4.0, cfg_trunc=1.0)


@pytest.fixture
def pipe(tiny_models):
    return Pipeline(ModelPaths.from_dir(tiny_models["root"]), device="cpu",
                    precision={"dit": "fp32", "text": "fp32", "vae": "fp32"})


def test_generate_runs_three_stages_and_returns_images(pipe):
    res = pipe.generate("1girl, smile", settings=GenerationSettings(seed=1, batch=2, **SMALL))
    assert res.images.shape == (2, 3, 48, 64) and res.images.dtype == torch.float32
    assert 0.0 <= res.images.min() and res.images.max() <= 1.0
    assert res.latents.shape == (2, 16, 6, 8)
    assert [r.stage for r in res.ledger.records] == ["text", "dit", "vae"]
    assert "text" in res.ledger.table()


def test_each_model_is_released_after_its_stage(pipe):
    pipe.precision_names.update(dit="bf16", text="bf16", vae="bf16")  # cast copies differ from the fp32 files
    seen = {}

    def spy(info):
        dit = pipe._models["dit"].module
        seen["dit_weight"] = weakref.ref(dit.x_embedder.weight.data)
        seen["dit_dtype"] = dit.x_embedder.weight.dtype

    pipe.generate("a cat", settings=GenerationSettings(seed=3, **SMALL), callback=spy)
    gc.collect()
    assert seen["dit_dtype"] == torch.bfloat16
    assert seen["dit_weight"]() is None, "the DiT's stage copy must be freed once sampling is done"
    for m in pipe.describe_models():
        assert m["device"] == "cpu" and "idle" in m["precision"], m


def test_keep_loaded_keeps_the_stage_copy(pipe):
    pipe.keep_loaded = True
    pipe.precision_names.update(dit="bf16")
    pipe.generate("a cat", settings=GenerationSettings(seed=3, **SMALL))
    assert pipe._models["dit"].precision.name == "bf16"


def test_embedding_cache_skips_the_text_encoders(pipe, monkeypatch):
    settings = GenerationSettings(seed=5, **SMALL)
    first = pipe.generate("blue sky", "lowres", settings=settings)
    calls = []
    monkeypatch.setattr(pipe, "_acquire", lambda role: calls.append(role) or Pipeline._acquire(pipe, role))
    second = pipe.generate("blue sky", "lowres", settings=settings)
    assert "gemma" not in calls and "jina" not in calls
    assert "text" not in [r.stage for r in second.ledger.records]
    assert torch.equal(first.latents, second.latents)
    assert pipe.cache.hits >= 2


def test_same_seed_reproduces_and_another_seed_differs(pipe):
    a = pipe.generate("x", settings=GenerationSettings(seed=7, **SMALL)).latents
    b = pipe.generate("x", settings=GenerationSettings(seed=7, **SMALL)).latents
    c = pipe.generate("x", settings=GenerationSettings(seed=8, **SMALL)).latents
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_changing_precision_recasts_without_reading_disk(pipe, monkeypatch):
    pipe.generate("x", settings=GenerationSettings(seed=1, **SMALL))
    import newbie_core.loading as loading
    monkeypatch.setattr(loading, "load_role", lambda *a, **k: pytest.fail("disk read on precision change"))
    pipe.set_precision("dit", "bf16")
    pipe.generate("x", settings=GenerationSettings(seed=1, **SMALL))


def test_size_not_multiple_of_16_is_refused_before_any_work(pipe):
    with pytest.raises(InputError, match="16"):
        pipe.generate("x", settings=GenerationSettings(width=100, height=64))
    assert pipe.ledger.records == []


def test_out_of_memory_in_sampling_releases_models_and_explains(pipe, monkeypatch):
    import newbie_core.stages as stages

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(stages, "integrate", oom)
    pipe.precision_names.update(dit="bf16")
    with pytest.raises(StageOutOfMemoryError, match="DiT sampling stage.*fp8_e4m3fn"):
        pipe.generate("x", settings=GenerationSettings(seed=1, **SMALL))
    assert all(m["device"] == "cpu" and "idle" in m["precision"] for m in pipe.describe_models())
    monkeypatch.undo()
    assert pipe.generate("x", settings=GenerationSettings(seed=1, **SMALL)).images.shape[0] == 1


def test_unload_all_also_drops_the_compiled_dit(pipe, monkeypatch):
    """The compiled forward wraps the DiT module: keeping it after unload_all would keep the whole DiT alive."""
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)  # the bookkeeping, not inductor
    pipe.compile = True
    pipe.generate("a cat", settings=GenerationSettings(seed=1, **SMALL))
    dit = weakref.ref(pipe._models["dit"].module)
    assert pipe._compiled is not None and pipe._compiled[0] is dit()
    pipe.unload_all()
    gc.collect()
    assert pipe._compiled is None and dit() is None
