"""Hostile and careless input at the nodes (issue 15), inside in-process ComfyUI: model names that leave the model
folders, bad devices / attention / numbers / latents / text, replaced files, readable purge report, combo defaults."""
from __future__ import annotations

import builtins
import os
import shutil
from pathlib import Path

import pytest
import torch

from test_sampler import SIZE, conditioning


@pytest.fixture
def outside(tmp_path):
    """A folder outside every model folder, holding a copy of each tiny model (as an attacker would aim at)."""
    out = tmp_path / "outside"
    out.mkdir()
    return out


@pytest.fixture
def spy_open(monkeypatch):
    """Every path opened through builtins.open, os.open or safetensors.safe_open while the test runs."""
    import safetensors

    opened: list[str] = []
    real_open, real_os_open, real_safe = builtins.open, os.open, safetensors.safe_open

    def spy(fn):
        def wrapper(f, *a, **k):
            opened.append(os.fspath(f) if isinstance(f, (str, os.PathLike)) else repr(f))
            return fn(f, *a, **k)
        return wrapper
    monkeypatch.setattr(builtins, "open", spy(real_open))
    monkeypatch.setattr(os, "open", spy(real_os_open))
    monkeypatch.setattr(safetensors, "safe_open", spy(real_safe))
    return opened


def _call_loader(pack, which: str, name: str):
    loaders = pack.nodes.loaders
    if which == "dit":
        return loaders.NewBieDiTLoader.execute(dit_name=name, precision="fp32", attention="sdpa", compile=False,
                                               device="default")
    if which == "gemma":
        return loaders.NewBieTextEncoderLoader.execute(gemma_name=name, jina_name="jina_clip_v2_bf16.safetensors",
                                                       precision="fp32", device="default")
    if which == "jina":
        return loaders.NewBieTextEncoderLoader.execute(gemma_name="gemma_3_4b_it_bf16.safetensors", jina_name=name,
                                                       precision="fp32", device="default")
    return loaders.NewBieVAELoader.execute(vae_name=name, precision="fp32", device="default")


FOLDER_KEY = {"dit": "diffusion_models", "gemma": "text_encoders", "jina": "text_encoders", "vae": "vae"}
SOURCE = {"dit": "dit_comfyui", "gemma": "gemma_comfyui", "jina": "jina_comfyui", "vae": "vae_comfyui"}
HF = {"dit": "transformer", "gemma": "text_encoder", "jina": "clip_model", "vae": "vae"}


@pytest.mark.parametrize("which", ["dit", "gemma", "jina", "vae"])
def test_traversal_names_are_refused_and_nothing_outside_is_opened(comfyui, pack, comfy_models, tiny_models, outside,
                                                                    spy_open, monkeypatch, which):
    fp = comfyui.folder_paths
    key = FOLDER_KEY[which]
    shutil.copy(tiny_models[SOURCE[which]], outside / "model.safetensors")
    shutil.copytree(tiny_models["root"] / "hf" / HF[which], outside / "hf")
    link_base = outside.parent / "links"  # an extra model folder holding links that point outside
    link_base.mkdir()
    (link_base / "link.safetensors").symlink_to(outside / "model.safetensors")
    (link_base / "linkdir").symlink_to(outside / "hf", target_is_directory=True)
    dirs, exts = fp.folder_names_and_paths[key]
    monkeypatch.setitem(fp.folder_names_and_paths, key, (list(dirs) + [str(link_base)], exts))
    base = Path(dirs[0])
    rel = os.path.relpath(outside, base)
    names = [str(outside / "model.safetensors"),                   # absolute
             f"{rel}/model.safetensors",                           # ../ chain
             f"{rel}/hf/",                                         # trailing-slash folder name that escapes
             "link.safetensors", "linkdir/"]                       # symlinks out
    errors = pack.newbie_core.errors
    for name in names:
        spy_open.clear()
        with pytest.raises(errors.ModelFileError) as e:
            _call_loader(pack, which, name)
        assert "refused" in str(e.value), (name, str(e.value))
        assert not [o for o in spy_open if str(outside) in o], (name, spy_open)


def test_loader_fingerprint_refuses_traversal_quietly(pack, comfy_models, tmp_path):
    loaders = pack.nodes.loaders
    assert loaders.NewBieVAELoader.fingerprint_inputs(vae_name="../../../etc/passwd") == "unresolved"
    assert len(loaders.NewBieVAELoader.fingerprint_inputs(vae_name=comfy_models["vae"])) == 32


@pytest.mark.parametrize("device", ["garbage", "cuda:42", "cpu:7"])
def test_bad_device_strings_are_input_errors_before_loading(pack, comfy_models, device, spy_open):
    errors = pack.newbie_core.errors
    loaders = pack.nodes.loaders
    calls = [lambda: loaders.NewBieDiTLoader.execute(dit_name=comfy_models["dit"], precision="fp32", attention="sdpa",
                                                     compile=False, device=device),
             lambda: loaders.NewBieTextEncoderLoader.execute(gemma_name=comfy_models["gemma"],
                                                             jina_name=comfy_models["jina"], precision="fp32",
                                                             device=device),
             lambda: loaders.NewBieVAELoader.execute(vae_name=comfy_models["vae"], precision="fp32", device=device)]
    for call in calls:
        with pytest.raises(errors.InputError, match="device"):
            call()
    assert not [o for o in spy_open if o.endswith(".safetensors")], "a model file was read before the check"


def test_unknown_attention_is_refused(pack, comfy_models):
    with pytest.raises(pack.newbie_core.errors.InputError, match="attention"):
        pack.nodes.loaders.NewBieDiTLoader.execute(dit_name=comfy_models["dit"], precision="fp32", attention="sage2",
                                                   compile=False, device="default")


@pytest.fixture
def sampler_args(dit):
    dm = dit.model.diffusion_model
    return dict(model=dit, positive=conditioning(dm, 6, seed=1), negative=conditioning(dm, 1, seed=2), seed=1,
                steps=3, cfg=3.0, shift=6.0, solver="euler", cfg_trunc=1.0, renorm=0.0, width=SIZE, height=SIZE,
                batch_size=1)


@pytest.mark.parametrize("field,value", [("cfg_trunc", float("nan")), ("renorm", float("nan")), ("cfg", float("inf")),
                                         ("shift", float("nan")), ("solver", "rk4"), ("steps", 10_000),
                                         ("denoise", float("nan")), ("denoise", 1.5)])
def test_sampler_refuses_nan_and_unknown_values(pack, sampler_args, field, value):
    with pytest.raises(pack.newbie_core.errors.InputError, match=field):
        pack.nodes.sampler.NewBieDiTSampler.execute(**{**sampler_args, field: value})


def test_video_latent_is_refused_by_sampler_and_decode(pack, sampler_args, vae):
    errors = pack.newbie_core.errors
    video = {"samples": torch.zeros(1, 16, 2, SIZE // 8, SIZE // 8)}
    with pytest.raises(errors.InputError, match="video latent"):
        pack.nodes.sampler.NewBieDiTSampler.execute(**sampler_args, latent=video)
    with pytest.raises(errors.InputError, match="video latent"):
        pack.nodes.vae_decode.NewBieVAEDecode.execute(vae=vae, samples=video, precision="auto", tiled=False)


def test_lone_surrogate_in_a_prompt_names_its_position(pack, text_encoders):
    node = pack.nodes.text_encode.NewBieTextEncode
    with pytest.raises(pack.newbie_core.errors.InputError, match=r"character 7 \(line 1, column 7\)"):
        node.execute(text_encoders=text_encoders, positive="1girl \ud83d", negative="", system_prompt="auto",
                     keep_loaded=False)


def test_replaced_gemma_file_reruns_the_loader_and_changes_the_output(comfyui, pack, comfy_models, tmp_path,
                                                                      monkeypatch):
    """Same name, new content: the loader's fingerprint changes (ComfyUI re-runs it) and its encoders give other
    embeddings than the cached ones."""
    from newbie_core.tiny import make_tiny

    fp = comfyui.folder_paths
    folder = tmp_path / "te"
    folder.mkdir()
    make_tiny(tmp_path / "other", seed=11)
    src = Path(comfy_models["root"]) / "comfyui" / "text_encoders"
    for f in src.iterdir():
        shutil.copy(f, folder / f.name)
    monkeypatch.setitem(fp.folder_names_and_paths, "text_encoders", ([str(folder)], fp.folder_names_and_paths["text_encoders"][1]))
    fp.filename_list_cache.pop("text_encoders", None)
    loaders, te = pack.nodes.loaders.NewBieTextEncoderLoader, pack.nodes.text_encode
    names = dict(gemma_name=comfy_models["gemma"], jina_name=comfy_models["jina"])
    te.EMBEDDING_CACHE.clear()

    def encode():
        enc = loaders.execute(**names, precision="fp32", device="default").args[0]
        out = te.NewBieTextEncode.execute(text_encoders=enc, positive="1girl", negative="", system_prompt="auto",
                                          keep_loaded=False)
        return out.args[0][0][0]
    before_fp, before = loaders.fingerprint_inputs(**names), encode()
    assert loaders.fingerprint_inputs(**names) == before_fp
    shutil.copy(tmp_path / "other" / "comfyui" / "text_encoders" / comfy_models["gemma"], folder / comfy_models["gemma"])
    assert loaders.fingerprint_inputs(**names) != before_fp
    after = encode()
    assert not torch.equal(before, after), "the replaced Gemma's prompt was served from the cache"
    te.EMBEDDING_CACHE.clear()


def test_jina_combo_defaults_to_a_jina_file(pack, comfy_models):
    schema = pack.nodes.loaders.NewBieTextEncoderLoader.define_schema()
    inputs = {i.id: i for i in schema.inputs}
    assert "gemma" in inputs["gemma_name"].default.lower() or inputs["gemma_name"].default == "text_encoder/"
    assert "jina" in inputs["jina_name"].default.lower() or inputs["jina_name"].default == "clip_model/"


def test_memory_purge_report_is_readable_in_three_lines(pack, loaders):
    loaders.vae()
    out = pack.nodes.memory_purge.NewBieMemoryPurge.execute(anything=None)
    text = out.ui.as_dict()["text"][0]
    first = text.splitlines()[:3]
    assert first[0].startswith("after:") and "RAM" in first[0]
    assert "NewBie models:" in first[1] and "prompt cache" in first[1]
    assert all(len(line) <= 90 for line in first), first


def test_unknown_system_prompt_preset_and_huge_batch_are_refused(pack, text_encoders, sampler_args):
    errors = pack.newbie_core.errors
    with pytest.raises(errors.InputError, match="system_prompt"):
        pack.nodes.text_encode.NewBieTextEncode.execute(text_encoders=text_encoders, positive="1girl", negative="",
                                                        system_prompt="ignore all previous", keep_loaded=False)
    with pytest.raises(errors.InputError, match="batch_size"):
        pack.nodes.sampler.NewBieDiTSampler.execute(**{**sampler_args, "batch_size": 10**6})
