"""Real folder layouts users have: legacy ComfyUI folder names, HF folders inside ComfyUI folders, a Jina tokenizer
in a sibling clip_tokenizer/, ambiguous folders refused naming every candidate, and the Jina token limit option."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
import torch

from newbie_core.cli import _generate_parser
from newbie_core.cli_checks import model_paths_for
from newbie_core.errors import InputError, ModelFileError
from newbie_core.files import weight_files
from newbie_core.loading import load_role
from newbie_core.model_paths import ModelPaths
from newbie_core.text.jina import load_jina
from newbie_core.tiny import COMFY_DIT_NAME, COMFY_GEMMA_NAME, COMFY_JINA_NAME, COMFY_VAE_NAME


def _link(dst: Path, src: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src)
    return dst


@pytest.fixture(scope="module")
def tiny(tiny_models):
    root = Path(tiny_models["root"])
    return {"c": root / "comfyui", "hf": root / "hf"}


def comfy_layout(root: Path, tiny: dict, dit="diffusion_models", text="text_encoders") -> Path:
    c = tiny["c"]
    _link(root / dit / COMFY_DIT_NAME, c / "diffusion_models" / COMFY_DIT_NAME)
    _link(root / text / COMFY_GEMMA_NAME, c / "text_encoders" / COMFY_GEMMA_NAME)
    _link(root / text / COMFY_JINA_NAME, c / "text_encoders" / COMFY_JINA_NAME)
    _link(root / "vae" / COMFY_VAE_NAME, c / "vae" / COMFY_VAE_NAME)
    return root


# ------------------------------------------------------------------------------- ComfyUI models/ folders
@pytest.mark.parametrize("dit,text", [("unet", "clip"), ("diffusion_models", "clip"), ("unet", "text_encoders"),
                                      ("checkpoints", "text_encoders")])
def test_legacy_and_guide_folder_names_are_found(tiny, tmp_path, dit, text):
    root = comfy_layout(tmp_path / "models", tiny, dit=dit, text=text)
    p = ModelPaths.from_dir(root)
    assert p.dit == root / dit / COMFY_DIT_NAME
    assert (p.gemma, p.jina) == (root / text / COMFY_GEMMA_NAME, root / text / COMFY_JINA_NAME)
    assert p.vae == root / "vae" / COMFY_VAE_NAME


def test_every_model_loads_from_the_legacy_layout(tiny, tmp_path):
    p = ModelPaths.from_dir(comfy_layout(tmp_path / "models", tiny, dit="unet", text="clip"))
    for role in ("dit", "gemma", "jina", "vae"):
        loaded = load_role(role, p)
        assert sum(t.numel() for t in loaded.module.parameters()) > 0, role
        assert Path(loaded.source).parent.name in ("unet", "clip", "vae")


def test_hf_folders_inside_comfyui_text_encoder_folders(tiny, tmp_path):
    """NewBie's own ComfyUI nodes load the text encoders from HF folders (gemma-3-4b-it/, jina-clip-v2/)."""
    root = tmp_path / "models"
    c = tiny["c"]
    _link(root / "unet" / COMFY_DIT_NAME, c / "diffusion_models" / COMFY_DIT_NAME)
    _link(root / "clip" / "gemma-3-4b-it", tiny["hf"] / "text_encoder")
    _link(root / "clip" / "jina-clip-v2", tiny["hf"] / "clip_model")
    _link(root / "vae" / COMFY_VAE_NAME, c / "vae" / COMFY_VAE_NAME)
    p = ModelPaths.from_dir(root)
    assert (p.gemma.name, p.jina.name) == ("gemma-3-4b-it", "jina-clip-v2")
    assert load_role("jina", p).wrapper.encode(["cat"]).shape[0] == 1


def test_two_candidate_files_for_one_role_are_refused_naming_both(tiny, tmp_path):
    root = comfy_layout(tmp_path / "models", tiny)
    copy = root / "text_encoders" / "gemma_3_4b_it_fp8_scaled.safetensors"
    shutil.copy(tiny["c"] / "text_encoders" / COMFY_GEMMA_NAME, copy)
    with pytest.raises(ModelFileError) as e:
        ModelPaths.from_dir(root)
    msg = str(e.value)
    assert COMFY_GEMMA_NAME in msg and copy.name in msg and "--gemma" in msg
    # the CLI's explicit --gemma settles it; the other roles still come from the folder
    p = ModelPaths.from_dir(root, given={"gemma": copy})
    assert p.gemma == copy and p.jina.name == COMFY_JINA_NAME


def test_same_file_in_unet_and_diffusion_models_is_not_ambiguous(tiny, tmp_path):
    root = comfy_layout(tmp_path / "models", tiny)
    _link(root / "unet" / COMFY_DIT_NAME, root / "diffusion_models" / COMFY_DIT_NAME)
    assert ModelPaths.from_dir(root).dit == root / "diffusion_models" / COMFY_DIT_NAME


def test_flux_ae_wins_over_other_vaes(tiny, tmp_path):
    root = comfy_layout(tmp_path / "models", tiny)
    shutil.copy(tiny["c"] / "vae" / COMFY_VAE_NAME, root / "vae" / "sdxl_vae.safetensors")
    assert ModelPaths.from_dir(root).vae.name == COMFY_VAE_NAME
    (root / "vae" / COMFY_VAE_NAME).unlink()
    shutil.copy(root / "vae" / "sdxl_vae.safetensors", root / "vae" / "sd15_vae.safetensors")
    with pytest.raises(ModelFileError, match="sd15_vae.safetensors.*sdxl_vae.safetensors"):
        ModelPaths.from_dir(root)


# --------------------------------------------------------------------------- one model folder, two files
def test_folder_with_a_weight_file_and_a_single_file_copy_is_refused(tiny, tmp_path):
    folder = tmp_path / "clip_model"
    shutil.copytree(tiny["hf"] / "clip_model", folder)
    shutil.copy(tiny["c"] / "text_encoders" / COMFY_JINA_NAME, folder / COMFY_JINA_NAME)
    with pytest.raises(ModelFileError) as e:
        load_jina(folder)
    assert "model.safetensors" in str(e.value) and COMFY_JINA_NAME in str(e.value)
    (folder / COMFY_JINA_NAME).unlink()
    assert load_jina(folder, dtype=torch.float32).encode(["cat"]).shape[0] == 1


def test_shards_without_an_index_are_still_read(tiny, tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        shutil.copy(tiny["c"] / "vae" / COMFY_VAE_NAME, folder / name)
    assert [f.name for f in weight_files(folder)] == ["model-00001-of-00002.safetensors",
                                                      "model-00002-of-00002.safetensors"]


# ------------------------------------------------------------------------------------ Jina tokenizer
def test_jina_tokenizer_in_a_sibling_clip_tokenizer_folder(tiny, tmp_path):
    """diffusers-style NewBie layout: clip_model/ holds the weights, clip_tokenizer/ the tokenizer."""
    model = tmp_path / "clip_model"
    tok = tmp_path / "clip_tokenizer"
    model.mkdir()
    tok.mkdir()
    for f in (tiny["hf"] / "clip_model").iterdir():
        shutil.copy(f, (tok if f.name.startswith("tokenizer") else model) / f.name)
    reference = load_jina(tiny["hf"] / "clip_model", dtype=torch.float32)
    got = load_jina(model, dtype=torch.float32)
    assert torch.equal(got.tokenize(["1girl, smile"])[0], reference.tokenize(["1girl, smile"])[0])
    assert torch.equal(got.encode(["1girl, smile"]), reference.encode(["1girl, smile"]))


def test_gemmas_sibling_tokenizer_folder_is_never_taken_for_jinas(tiny, tmp_path):
    model = tmp_path / "clip_model"
    model.mkdir()
    for f in (tiny["hf"] / "clip_model").iterdir():
        if not f.name.startswith("tokenizer"):
            shutil.copy(f, model / f.name)
    shutil.copytree(tiny["hf"] / "text_encoder", tmp_path / "tokenizer")
    with pytest.raises(ModelFileError, match="clip_tokenizer"):
        load_jina(model)


# ------------------------------------------------------------------------------------- Jina max length
def test_jina_max_length_is_an_option(tiny):
    long_prompt = ", ".join(f"tag{i} word{i}" for i in range(1500))
    short = load_jina(tiny["hf"] / "clip_model", dtype=torch.float32)
    long = load_jina(tiny["hf"] / "clip_model", dtype=torch.float32, max_length=2048)
    n512, n2048 = short.tokenize([long_prompt])[0].shape[1], long.tokenize([long_prompt])[0].shape[1]
    assert n512 == 512 and n2048 == 2048
    assert long.tokenize(["cat"])[0].tolist() == short.tokenize(["cat"])[0].tolist()  # short prompts: the same


@pytest.mark.parametrize("bad", [0, 7, 9000])
def test_jina_max_length_out_of_range_is_refused(tiny, bad):
    with pytest.raises(InputError, match="512.*2048"):
        load_jina(tiny["hf"] / "clip_model", max_length=bad)


def test_cli_jina_max_length_reaches_the_loader(tiny, tmp_path):
    root = comfy_layout(tmp_path / "models", tiny, dit="unet", text="clip")
    parser = argparse.ArgumentParser()
    _generate_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["generate", "--prompt", "x", "--out", str(tmp_path / "o.png"),
                                      "--model-dir", str(root), "--jina-max-length", "2048"])
    with model_paths_for(args) as (paths, tiny_used):
        assert not tiny_used and paths.jina_max_length == 2048
        assert load_role("jina", paths).wrapper.max_length == 2048
