"""One engine, two hosts, through a real ComfyUI server: the image a queued prompt saves equals, pixel for pixel,
the CLI pipeline's for the same tiny files, prompt, seed and settings (every precision, every solver)."""
from __future__ import annotations

import io

import numpy as np
import pytest

from test_pack_server import DIT, GEMMA, JINA, VAE, pipeline

SIZE, STEPS, SEED = 48, 3, 5
POSITIVE, NEGATIVE = "1girl, smile, cherry blossoms", "lowres"


def graph(precision: str, solver: str) -> dict:
    """Loaders (DiT and text encoders in `precision`, VAE fp32) → Text Encode → Sampler → VAE Decode → Preview."""
    return pipeline(POSITIVE, NEGATIVE, seed=SEED, steps=STEPS, size=SIZE, solver=solver, cfg_trunc=0.7,
                    te_precision=precision, dit_precision=precision, cfg=3.0)


def cli_pixels(files: dict, precision: str, solver: str, seed: int = SEED) -> np.ndarray:
    """The CLI pipeline's image on the same files, as ComfyUI's image nodes turn it into 8-bit pixels."""
    from newbie_core.model_paths import ModelPaths
    from newbie_core.pipeline import GenerationSettings, Pipeline
    from newbie_core.text.prompts import resolve_system_prompt

    paths = ModelPaths(dit=files[f"diffusion_models/{DIT}"], gemma=files[f"text_encoders/{GEMMA}"],
                       jina=files[f"text_encoders/{JINA}"], vae=files[f"vae/{VAE}"])
    pipe = Pipeline(paths, device="cpu", precision={"dit": precision, "text": precision, "vae": "fp32"})
    settings = GenerationSettings(width=SIZE, height=SIZE, steps=STEPS, cfg=3.0, shift=6.0, solver=solver,
                                  cfg_trunc=0.7, seed=seed)
    res = pipe.generate(POSITIVE, NEGATIVE, settings, system_prompt=resolve_system_prompt("auto", POSITIVE))
    return np.clip(255.0 * res.images[0].permute(1, 2, 0).numpy(), 0, 255).astype(np.uint8)


def served_pixels(comfy, api_graph: dict) -> np.ndarray:
    """Queue `api_graph`, wait, and read back the one image it previews as 8-bit RGB."""
    from PIL import Image

    entry = comfy.run(api_graph, timeout=240)
    (img,) = comfy.output_images(entry)
    data = comfy.view(img["filename"], img.get("subfolder", ""), img.get("type", "temp"))
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.parametrize("precision, solver", [("fp32", "euler"), ("bf16", "midpoint"), ("fp16", "euler"),
                                               ("fp8_e4m3fn", "dpmpp_2m")])
def test_server_image_equals_the_cli_image(comfy, comfy_tiny_files, precision, solver):
    served = served_pixels(comfy, graph(precision, solver))
    expected = cli_pixels(comfy_tiny_files, precision, solver)
    assert served.shape == expected.shape == (SIZE, SIZE, 3)
    assert np.array_equal(served, expected), f"{precision} {solver}: {np.abs(served.astype(int) - expected).max()}"


def test_the_comparison_can_fail(comfy, comfy_tiny_files):
    """Another seed on the CLI side gives other pixels (the equality above is not vacuous)."""
    served = served_pixels(comfy, graph("fp32", "euler"))
    assert not np.array_equal(served, cli_pixels(comfy_tiny_files, "fp32", "euler", seed=SEED + 1))
