"""One engine, two hosts: the nodes (ComfyUI host) and the CLI pipeline run the same stage code, so the same tiny
models, prompt, seed and settings give the same image bit for bit, for every precision and every solver."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

PROMPT, NEGATIVE = "1girl, smile, cherry blossoms", "lowres"
SETTINGS = dict(seed=11, cfg=3.0, shift=6.0, cfg_trunc=0.7, renorm=0.0, width=32, height=48, batch_size=1)


def node_image(pack, loaders, precision: str, solver: str, steps: int):
    te = pack.nodes.text_encode
    te.EMBEDDING_CACHE.clear()
    enc = loaders.text_encoders(precision=precision)
    pos, neg = te.NewBieTextEncode.execute(text_encoders=enc, positive=PROMPT, negative=NEGATIVE,
                                           system_prompt="auto", keep_loaded=False).args
    latent = pack.nodes.sampler.NewBieDiTSampler.execute(model=loaders.dit(precision=precision, attention="auto"),
                                                         positive=pos, negative=neg, steps=steps, solver=solver,
                                                         **SETTINGS).args[0]
    image = pack.nodes.vae_decode.NewBieVAEDecode.execute(vae=loaders.vae(precision="fp32"), samples=latent,
                                                          precision="auto", tiled=False).args[0]
    return latent["samples"], image


def cli_image(pack, tiny_models, precision: str, solver: str, steps: int):
    core = pack.newbie_core
    c = Path(tiny_models["root"]) / "comfyui"  # the very files the loader nodes read
    from newbie_core.tiny import COMFY_DIT_NAME, COMFY_GEMMA_NAME, COMFY_JINA_NAME, COMFY_VAE_NAME

    paths = core.model_paths.ModelPaths(dit=c / "diffusion_models" / COMFY_DIT_NAME,
                                        gemma=c / "text_encoders" / COMFY_GEMMA_NAME,
                                        jina=c / "text_encoders" / COMFY_JINA_NAME, vae=c / "vae" / COMFY_VAE_NAME)
    pipe = core.pipeline.Pipeline(paths, device="cpu", precision={"dit": precision, "text": precision, "vae": "fp32"})
    s = dict(SETTINGS)
    settings = core.pipeline.GenerationSettings(batch=s.pop("batch_size"), steps=steps, solver=solver, **s)
    system = core.text.prompts.resolve_system_prompt("auto", PROMPT)
    res = pipe.generate(PROMPT, NEGATIVE, settings, system_prompt=system)
    return res.latents, res.images.permute(0, 2, 3, 1)


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32", "fp8_e4m3fn"])
def test_nodes_and_cli_give_the_same_image_bit_for_bit(pack, loaders, tiny_models, precision):
    for solver in pack.newbie_core.sampling.SOLVERS:
        n_lat, n_img = node_image(pack, loaders, precision, solver, steps=3)
        c_lat, c_img = cli_image(pack, tiny_models, precision, solver, steps=3)
        assert torch.isfinite(n_img).all() and n_img.shape == (1, 48, 32, 3)
        assert torch.equal(n_lat, c_lat), f"{precision} {solver}: latents differ"
        assert torch.equal(n_img, c_img), f"{precision} {solver}: images differ"


def test_different_settings_do_give_different_images(pack, loaders, tiny_models):
    """The bitwise comparison above can fail: another solver changes the picture."""
    a = node_image(pack, loaders, "fp32", "euler", steps=3)[1]
    b = cli_image(pack, tiny_models, "fp32", "midpoint", steps=3)[1]
    assert not torch.equal(a, b)
