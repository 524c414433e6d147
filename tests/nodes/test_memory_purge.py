"""NewBie Memory Purge: passthrough, never cached, unloads every pack model, report, order unload → gc → empty cache."""
from __future__ import annotations

import gc
import json
import math

import pytest
import torch


def purge(pack, anything=None):
    out = pack.nodes.memory_purge.NewBieMemoryPurge.execute(anything=anything)
    value, report = out.args
    return value, report, out.ui.as_dict()["text"][0]


def test_passes_any_input_through_unchanged(pack):
    values = [torch.ones(2, 3), {"samples": torch.zeros(1, 16, 2, 2)}, "text",
              [[torch.zeros(1, 2, 3), {"pooled_output": torch.zeros(1, 3)}]]]
    for value in values:
        out, _, _ = purge(pack, value)
        assert out is value
    assert pack.nodes.memory_purge.NewBieMemoryPurge.execute().args[0] is None  # nothing connected


def test_never_cached(pack):
    cls = pack.nodes.memory_purge.NewBieMemoryPurge
    for args in ({}, {"anything": torch.ones(1)}, {"anything": "x"}):
        fp = cls.fingerprint_inputs(**args)
        assert isinstance(fp, float) and math.isnan(fp)
        assert fp != cls.fingerprint_inputs(**args)  # NaN != NaN: ComfyUI's cache never matches


def test_purge_unloads_every_pack_model_and_reports_them(comfyui, pack, loaders):
    mm = comfyui.mm
    dit = loaders.dit(precision="bf16")
    enc = loaders.text_encoders(precision="fp8_e4m3fn")
    vae = loaders.vae(precision="fp32")
    mine = [dit, enc.gemma_patcher, enc.jina_patcher, vae.patcher]
    mm.load_models_gpu(mine)
    loaded = [lm.model for lm in mm.current_loaded_models]
    assert all(any(p is m for m in loaded) for p in mine)

    value, report, text = purge(pack, "x")
    assert value == "x"
    assert not any(lm.model is p for lm in mm.current_loaded_models for p in mine)
    assert not any(hasattr(lm.model, "newbie_label") for lm in mm.current_loaded_models)

    rows = json.loads(report)["models"]
    assert {"before", "after"} <= set(json.loads(report))
    # weight dtypes (small fp32 buffers such as RoPE tables and ComfyUI's sigmas are listed too)
    expected = {dit.newbie_label: {"bfloat16"}, enc.gemma_patcher.newbie_label: {"bfloat16", "float8_e4m3fn"},
                enc.jina_patcher.newbie_label: {"bfloat16"}, vae.patcher.newbie_label: {"float32"}}
    for label, dtypes in expected.items():
        matching = [r for r in rows if r["model"] == label and dtypes <= set(r["dtypes"])]
        assert matching, f"{label} ({dtypes}) missing from the report: {rows}"
        row = matching[0]
        assert row["devices"] == ["cpu"] and row["size_mib"] >= 0 and row["loaded_by_comfyui"] is False
        line = f"  {label}: {', '.join(row['dtypes'])} on cpu, {row['size_mib']} MiB"
        assert line in text.splitlines(), f"{line!r} not in the report text:\n{text}"
    assert "float8_e4m3fn" not in {d for r in rows if r["model"] == vae.patcher.newbie_label for d in r["dtypes"]}
    assert "(loaded)" not in text
    assert text.startswith("after: RAM used") and "\nbefore: RAM used" in text  # the summary first (issue 15)
    assert dit.newbie_label.startswith("DiT (") and "Gemma3" in enc.gemma_patcher.newbie_label
    assert "Jina" in enc.jina_patcher.newbie_label and vae.patcher.newbie_label.startswith("VAE (")


def test_report_marks_models_still_loaded(comfyui, pack, loaders, monkeypatch):
    """The report's 'loaded' flag comes from ComfyUI's list (here the unload is stubbed out to keep one loaded)."""
    dit = loaders.dit(precision="bf16")
    comfyui.mm.load_models_gpu([dit])
    monkeypatch.setattr(comfyui.mm, "unload_all_models", lambda: None)
    _, report, text = purge(pack)
    rows = [r for r in json.loads(report)["models"] if r["loaded_by_comfyui"]]
    assert [r["model"] for r in rows] == [dit.newbie_label]
    # the session's own fp32 DiT (another test's fixture) may be listed under the same label: take the loaded one
    line = [ln for ln in text.splitlines() if ln.startswith(f"  {dit.newbie_label}: ") and "(loaded)" in ln][0]
    assert "bfloat16" in line and line.endswith("MiB (loaded)")


def test_purge_order_unload_then_gc_then_empty_cache(comfyui, pack, monkeypatch):
    mm, _comfy = comfyui.mm, pack.nodes._comfy
    order = []

    depth = [0]

    def recorder(name, real):
        """Record top-level calls only (ComfyUI's unload empties its cache itself, inside the call)."""
        def wrapped(*args, **kwargs):
            if depth[0] == 0:
                order.append(name)
            depth[0] += 1
            try:
                return real(*args, **kwargs)
            finally:
                depth[0] -= 1
        return wrapped

    monkeypatch.setattr(mm, "unload_all_models", recorder("unload", mm.unload_all_models))
    monkeypatch.setattr(gc, "collect", recorder("gc", gc.collect))
    monkeypatch.setattr(_comfy, "empty_device_cache", recorder("empty_cache", _comfy.empty_device_cache))
    monkeypatch.setattr(pack.newbie_core.memory, "empty_device_cache",
                        recorder("empty_cache", pack.newbie_core.memory.empty_device_cache))
    monkeypatch.setattr(mm, "soft_empty_cache", recorder("soft_empty_cache", mm.soft_empty_cache))
    purge(pack)
    assert order[0] == "unload" and order.count("unload") == 1, order
    assert order[1] == "gc", f"garbage must be collected right after the unload: {order}"
    assert set(order[2:]) == {"empty_cache", "soft_empty_cache"}, order  # then the device caches


def test_no_pack_model_is_left_loaded_after_a_full_graph(comfyui, pack, dit, text_encoders, vae):
    """Stages keep models loaded with ComfyUI (text encoders with keep_loaded); the purge clears them all."""
    te = pack.nodes.text_encode
    te.EMBEDDING_CACHE.clear()
    pos, neg = te.NewBieTextEncode.execute(text_encoders=text_encoders, positive="1girl", negative="",
                                           system_prompt="auto", keep_loaded=True).args
    latent = pack.nodes.sampler.NewBieDiTSampler.execute(
        model=dit, positive=pos, negative=neg, seed=0, steps=2, cfg=2.0, shift=6.0, solver="euler", cfg_trunc=1.0,
        renorm=0.0, width=32, height=32, batch_size=1).args[0]
    image = pack.nodes.vae_decode.NewBieVAEDecode.execute(vae=vae, samples=latent, precision="auto", tiled=False).args[0]
    labels = lambda: [lm.model.newbie_label for lm in comfyui.mm.current_loaded_models  # noqa: E731
                      if hasattr(lm.model, "newbie_label")]
    assert len(labels()) == 4  # gemma, jina, DiT, VAE
    out, _, _ = purge(pack, image)
    assert out is image and labels() == []
    te.EMBEDDING_CACHE.clear()
