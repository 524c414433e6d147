"""Reliability of model loading (issue #5): missing, damaged and wrong files give a clear error, a failed load leaves
nothing in memory, no file's code ever runs, and nothing touches the network."""
from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from faults import lfs_pointer, malicious_pth, no_network, track_tensors_read, truncated_copy
from newbie_core.checkpoints import EXPECTED
from newbie_core.dit import load_dit
from newbie_core.errors import ModelFileError
from newbie_core.files import close_matches
from newbie_core.text.gemma import load_gemma
from newbie_core.text.jina import load_jina
from newbie_core.tiny.dit import tiny_dit_state_dict
from newbie_core.vae import load_vae

LOADERS = {"dit": load_dit, "gemma": load_gemma, "jina": load_jina, "vae": load_vae}


# ------------------------------------------------------------------------------------------ missing
def test_missing_file_names_the_folder_and_close_matches(tiny_models, tmp_path):
    folder = tmp_path / "diffusion_models"
    folder.mkdir()
    shutil.copy(tiny_models["dit_comfyui"], folder / "NewBie-Image-Exp0.1.safetensors")
    (folder / "unrelated_model.safetensors").write_bytes(b"")
    with pytest.raises(ModelFileError) as e:
        load_dit(folder / "NewBie-Image-Exp01.safetensors")
    msg = str(e.value)
    assert "'NewBie-Image-Exp01.safetensors' was not found in folder " + str(folder) in msg
    assert "Close matches: 'NewBie-Image-Exp0.1.safetensors'." in msg and "unrelated" not in msg
    assert EXPECTED in msg


@pytest.mark.parametrize("role", ["gemma", "jina", "vae"])
def test_every_loader_names_what_is_missing(role, tmp_path):
    with pytest.raises(ModelFileError, match=rf"'x.safetensors' was not found in folder {tmp_path}"):
        LOADERS[role](tmp_path / "x.safetensors")


def test_close_matches_cover_case_extension_and_typos():
    names = ["NewBie-Image-Exp0.1.safetensors", "ae.safetensors", "flux1-dev.safetensors", "gemma/"]
    assert close_matches("newbie-image-exp0.1.safetensors", names) == ["NewBie-Image-Exp0.1.safetensors"]
    assert close_matches("NewBie-Image-Exp0.1.sft", names) == ["NewBie-Image-Exp0.1.safetensors"]
    assert close_matches("ae.safetensor", names)[0] == "ae.safetensors"
    assert close_matches("totally_different.bin", names) == []


# ------------------------------------------------------------------------------------------ damaged
DAMAGE = {  # how the file was damaged → what the message must say
    "truncated_data": ("it is truncated: ", "are on disk, the rest of the tensor data is missing"),
    "truncated_header": ("truncated inside its header", ""),
    "empty": ("it is empty (0 bytes)", ""),
    "lfs_pointer": ("Git LFS pointer", "skipped the LFS data"),
    "html_page": ("web page (HTML)", "error or login page"),
}


def _damage(kind: str, src: Path, dst: Path) -> Path:
    if kind == "truncated_data":
        return truncated_copy(src, dst, 0.6)
    if kind == "truncated_header":
        return truncated_copy(src, dst, 100)
    if kind == "empty":
        return truncated_copy(src, dst, 0)
    if kind == "lfs_pointer":
        return lfs_pointer(dst)
    dst.write_text("<!DOCTYPE html><html><body>401 Unauthorized: log in to download</body></html>")
    return dst


@pytest.mark.parametrize("kind", DAMAGE)
@pytest.mark.parametrize("role", ["dit", "gemma", "jina", "vae"])
def test_damaged_file_is_named_with_what_is_wrong(tiny_models, tmp_path, role, kind):
    path = _damage(kind, tiny_models[f"{role}_comfyui"], tmp_path / Path(tiny_models[f"{role}_comfyui"]).name)
    with track_tensors_read() as read, pytest.raises(ModelFileError) as e:
        LOADERS[role](path)
    msg = str(e.value)
    what, detail = DAMAGE[kind]
    assert f"{path} is damaged: " in msg and what in msg and detail in msg, msg
    assert "Re-download it" in msg and "Nothing was loaded from it" in msg
    assert read == [], "a damaged file is refused from its header: no tensor is read"


@pytest.mark.parametrize("role", ["dit", "vae"])
def test_a_load_that_fails_part_way_leaves_nothing_in_memory(tiny_models, role):
    """An I/O error at the 6th tensor: the 5 tensors read before it must be freed although the caller (like
    ComfyUI while it reports the error) still holds the exception and with it the traceback."""
    with track_tensors_read(fail_after=5) as read, pytest.raises(ModelFileError, match="is damaged") as e:
        LOADERS[role](tiny_models[f"{role}_comfyui"])
    gc.collect()
    assert len(read) == 5 and e.value is not None
    assert [r for r in read if r() is not None] == [], "tensors of the failed load are still alive"


def test_a_dit_refused_after_reading_frees_what_it_read(tmp_path):
    """All tensors read, then the layout check fails (a key missing): nothing of it stays alive."""
    sd = tiny_dit_state_dict(0)
    del sd["layers.1.feed_forward.w3.weight"]
    save_file(sd, str(tmp_path / "incomplete.safetensors"))
    with track_tensors_read() as read, pytest.raises(ModelFileError, match="missing") as e:
        load_dit(tmp_path / "incomplete.safetensors")
    gc.collect()
    assert len(read) == len(sd) and e.value is not None
    assert [r for r in read if r() is not None] == []


# ------------------------------------------------------------------------------------------ wrong family
def _fake(tmp_path: Path, name: str, keys: list[str]) -> Path:
    path = tmp_path / f"{name}.safetensors"
    save_file({k: torch.zeros(2, 2) for k in keys}, str(path))
    return path


FAMILIES = {  # file → (keys, what the error must call it)
    "sdxl": (["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.label_emb.0.0.weight"],
             "an SDXL UNet checkpoint"),
    "flux": (["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"], "a FLUX transformer"),
    "flux_diffusers": (["transformer_blocks.0.attn.to_q.weight", "single_transformer_blocks.0.proj_out.weight"],
                       "a FLUX transformer (diffusers layout)"),
    "sd3": (["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "model.diffusion_model.pos_embed"],
            "an SD3 transformer"),
    "t5": (["encoder.block.0.layer.0.SelfAttention.q.weight", "shared.weight"], "a T5 text encoder"),
    "clip_l": (["text_model.encoder.layers.0.self_attn.q_proj.weight", "text_model.embeddings.token_embedding.weight"],
               "a CLIP text encoder"),
    "lora": (["lora_unet_input_blocks_1_0.lora_down.weight", "lora_unet_input_blocks_1_0.lora_up.weight"],
             "a LoRA (low-rank adapter weights, not a full model)"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_dit_loader_says_what_a_foreign_checkpoint_looks_like(tmp_path, family):
    keys, looks = FAMILIES[family]
    path = _fake(tmp_path, family, keys)
    with track_tensors_read() as read, pytest.raises(ModelFileError) as e:
        load_dit(path)
    msg = str(e.value)
    assert f"{path} is not a NewBie-image DiT: it looks like {looks}." in msg and EXPECTED in msg, msg
    assert read == [], "refused from the key names alone, before reading any tensor"


@pytest.mark.parametrize("role,file,looks", [
    ("dit", "gemma_comfyui", "a Gemma-3 text model"), ("dit", "vae_comfyui", "a VAE"),
    ("vae", "gemma_comfyui", "a Gemma-3 text model"), ("vae", "dit_comfyui", "a NewBie-image DiT"),
    ("gemma", "vae_comfyui", "a VAE"), ("gemma", "jina_comfyui", "a Jina CLIP / XLM-RoBERTa text model"),
    ("jina", "gemma_comfyui", "a Gemma-3 text model"), ("jina", "dit_comfyui", "a NewBie-image DiT"),
])
def test_each_loader_names_the_file_it_got_and_what_it_expected(tiny_models, role, file, looks):
    with pytest.raises(ModelFileError) as e:
        LOADERS[role](tiny_models[file])
    msg = str(e.value)
    expected = {"dit": "NewBie-Image-Exp0.1.safetensors", "vae": "ae.safetensors",
                "gemma": "gemma_3_4b_it_bf16.safetensors", "jina": "jina_clip_v2_bf16.safetensors"}[role]
    assert str(tiny_models[file]) in msg and f"looks like {looks}" in msg and expected in msg, msg


# ------------------------------------------------------------------------------------------ no code, no network
@pytest.mark.parametrize("role", ["dit", "vae"])
def test_a_pickle_with_code_is_refused_and_its_code_never_runs(tmp_path, role):
    marker = tmp_path / "pwned.txt"
    path = malicious_pth(tmp_path / "model.pth", marker)
    with pytest.raises(ModelFileError) as e:
        LOADERS[role](path)
    msg = str(e.value)
    assert f"{path} is a pickle checkpoint that needs code to load (WeightsUnpickler error: Unsupported global: " \
           "GLOBAL exec" in msg and "It was refused and nothing in it was run" in msg, msg
    assert "weights_only` set to `False`" not in msg, "never suggest the unsafe load"
    assert not marker.exists(), "code from the model file ran"
    torch.load(str(path), weights_only=False)  # the file really is malicious: an unsafe load runs its code
    assert marker.read_text() == "code from a model file ran"


def test_loading_every_model_makes_no_network_access(tiny_models):
    with no_network() as net:
        for role in LOADERS:
            LOADERS[role](tiny_models[f"{role}_comfyui"])
            LOADERS[role](tiny_models[f"{role}_hf"])
    assert net.log == []


def test_a_full_generation_runs_with_the_network_blocked_and_hf_offline_unset(tiny_models, tmp_path):
    """A fresh process (so no library read an offline flag at import) with every socket connect and DNS lookup
    blocked and recorded from the first line on, HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE unset: the CLI generates."""
    out = tmp_path / "out.png"
    script = (
        "import sys, json; sys.path.insert(0, sys.argv[1])\n"
        "from faults import no_network\n"
        "with no_network() as net:\n"
        "    from newbie_core.cli import main\n"
        "    rc = main(['generate', '--prompt', '1girl', '--out', sys.argv[2], '--model-dir', sys.argv[3],\n"
        "               '--width', '32', '--height', '32', '--steps', '3', '--solver', 'euler', '--device', 'cpu',\n"
        "               '--precision', 'dit=fp32,text=fp32,vae=fp32'])\n"
        "print(json.dumps({'rc': rc, 'attempts': net.log}))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "HUGGINGFACE"))}
    r = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parents[1]), str(out),
                        str(tiny_models["root"])], capture_output=True, text=True, env=env, timeout=240,
                       cwd=Path(__file__).parents[2])
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result == {"rc": 0, "attempts": []}, result
    assert out.is_file() and out.stat().st_size > 0
