"""DiT key layouts (official / ComfyUI / diffusers), config from shapes, loading sources and file errors."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from newbie_core.checkpoints import (EXPECTED, default_axes_dims, detect_layout, diffusers_to_official,
                                     dit_config_from_state_dict, official_to_comfyui, official_to_diffusers,
                                     to_official)
from newbie_core.dit import DiTConfig, NextDiT, load_dit
from newbie_core.errors import ModelFileError
from newbie_core.tiny.dit import TINY_DIT_CONFIG, tiny_dit_state_dict, write_tiny_dit


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    paths = write_tiny_dit(root, seed=0)
    paths["root"] = root
    return paths


@pytest.fixture(scope="module")
def sd():
    return tiny_dit_state_dict(0)


def _same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_layout_round_trips(sd):
    _same(to_official(official_to_comfyui(sd)), sd)
    diff = official_to_diffusers(sd)
    assert "layers.0.attn.to_q.weight" in diff and "norm_final.weight" not in diff
    assert diff["layers.0.attn.to_q.weight"].shape == (64, 64) and diff["layers.0.attn.to_k.weight"].shape == (32, 64)
    assert "context_refiner.0.norm1.weight" in diff and "noise_refiner.0.norm1.norm.weight" in diff
    assert "time_caption_embed.timestep_embedder.linear_2.bias" in diff and "norm_out.linear_1.weight" in diff
    back = to_official(diff)
    _same({k: v for k, v in back.items() if k != "norm_final.weight"},
          {k: v for k, v in sd.items() if k != "norm_final.weight"})
    assert torch.equal(back["norm_final.weight"], torch.ones(64))  # unused; dropped by diffusers
    _same(official_to_diffusers(diffusers_to_official(diff)), diff)
    _same(to_official(official_to_comfyui(back)), back)


def test_written_files_and_detection(tiny, sd):
    files = {k: load_file(str(tiny[k])) for k in ("dit_hf", "dit_comfyui", "dit_diffusers")}
    assert [detect_layout(f) for f in files.values()] == ["official", "comfyui", "diffusers"]
    _same(files["dit_hf"], sd)
    assert all(k.startswith("model.diffusion_model.") for k in files["dit_comfyui"])
    assert json.loads((tiny["dit_hf"].parent / "config.json").read_text())["n_kv_heads"] == 2
    assert all(v.dtype == torch.float32 for v in files["dit_hf"].values())


def test_config_from_shapes(sd):
    assert dit_config_from_state_dict(sd) == TINY_DIT_CONFIG  # 1 refiner, axes [4,6,6] recovered
    assert dit_config_from_state_dict(official_to_diffusers(sd)) == TINY_DIT_CONFIG
    with torch.device("meta"):
        full_sd = NextDiT(DiTConfig.full(), device="meta").state_dict()
    assert dit_config_from_state_dict(official_to_comfyui(full_sd)) == DiTConfig.full()
    assert default_axes_dims(96) == [32, 32, 32] and default_axes_dims(16) == [4, 6, 6]


def test_every_layout_loads_to_identical_outputs(tiny):
    x, t = torch.randn(2, 16, 8, 8), torch.tensor([0.2, 0.7])
    cf, pooled = torch.randn(2, 5, 64), torch.randn(2, 32)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    sources = [tiny["root"] / "hf", tiny["dit_hf"].parent, tiny["dit_hf"], tiny["dit_comfyui"],
               tiny["root"] / "diffusers", tiny["dit_diffusers"], tiny_dit_state_dict(0)]
    outs = []
    for s in sources:
        m = load_dit(s, dtype=torch.float32, attention="sdpa")
        assert not m.training and not any(p.requires_grad for p in m.parameters())
        outs.append(m(x, t, cf, mask, pooled))
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


def test_all_in_one_and_sharded(tiny, tmp_path, sd):
    comfy = load_file(str(tiny["dit_comfyui"]))
    aio = {**comfy, "text_encoders.gemma3.transformer.model.embed_tokens.weight": torch.zeros(3, 4),
           "vae.decoder.conv_in.weight": torch.zeros(2, 2)}
    save_file(aio, str(tmp_path / "aio.safetensors"))
    m = load_dit(tmp_path / "aio.safetensors", dtype=torch.float32)
    _same({k: v for k, v in m.state_dict().items()}, sd)
    shard_dir = tmp_path / "transformer"
    shard_dir.mkdir()
    keys = sorted(sd)
    half = len(keys) // 2
    names = {"a.safetensors": keys[:half], "b.safetensors": keys[half:]}
    for name, ks in names.items():
        save_file({k: sd[k] for k in ks}, str(shard_dir / name))
    index = {"weight_map": {k: n for n, ks in names.items() for k in ks}}
    (shard_dir / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    _same(load_dit(tmp_path, dtype=torch.float32).state_dict(), sd)


def test_missing_file_names_path(tmp_path):
    p = tmp_path / "nope" / "NewBie-Image-Exp0.1.safetensors"
    with pytest.raises(ModelFileError, match="nope"):
        load_dit(p)


def test_sdxl_like_file_is_rejected(tmp_path):
    fake = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
            "model.diffusion_model.label_emb.0.0.weight": torch.zeros(4, 4),
            "model.diffusion_model.out.2.weight": torch.zeros(4, 4, 3, 3)}
    save_file(fake, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(ModelFileError) as e:
        load_dit(tmp_path / "sdxl.safetensors")
    msg = str(e.value)
    assert "SDXL UNet" in msg and EXPECTED in msg and "sdxl.safetensors" in msg


def test_lumina2_like_file_is_rejected(tmp_path, sd):
    lumina = {k: v for k, v in sd.items() if not k.startswith(("clip_text_pooled_proj", "time_text_embed"))}
    save_file(official_to_comfyui(lumina), str(tmp_path / "lumina.safetensors"))
    with pytest.raises(ModelFileError, match="Lumina Image 2.0.*CLIP pooled projection"):
        load_dit(tmp_path / "lumina.safetensors")
    with pytest.raises(ModelFileError, match="Lumina"):
        load_dit(official_to_diffusers(lumina))


def test_missing_and_unexpected_keys_are_listed(sd):
    broken = {k: v for k, v in sd.items() if k != "layers.1.feed_forward.w3.weight"}
    broken["layers.0.extra.weight"] = torch.zeros(2)
    with pytest.raises(ModelFileError) as e:
        load_dit(broken)
    msg = str(e.value)
    assert "layers.1.feed_forward.w3.weight" in msg and "layers.0.extra.weight" in msg
    bad_shape = dict(sd)
    bad_shape["layers.1.feed_forward.w3.weight"] = torch.zeros(3, 3)
    with pytest.raises(ModelFileError, match=r"layers\.1\.feed_forward\.w3\.weight has shape \(3, 3\), but the architecture expects"):
        load_dit(bad_shape)
