"""The interop matrix of the README, each row run in a real ComfyUI server on the tiny models: core samplers on our
MODEL/CONDITIONING, core conditioning and latent nodes into NewBie DiT Sampler, core VAE Encode outputs into it."""
from __future__ import annotations

import uuid

import pytest

from test_workflows import EXAMPLE_IMAGE, example_image, flux_arch_vae, png_size  # noqa: F401 - session fixtures

DIT, GEMMA, JINA, VAE = ("NewBie-Image-Exp0.1.safetensors", "gemma_3_4b_it_bf16.safetensors",
                         "jina_clip_v2_bf16.safetensors", "ae.safetensors")
SIZE, STEPS = 32, 3


def base_graph() -> dict:
    """Loaders "1"-"3", Text Encode "4"; a test adds the sampling part and decodes with `decode_from`."""
    return {
        "1": {"class_type": "NewBieDiTLoader", "inputs": {"dit_name": DIT, "precision": "fp32", "attention": "auto",
                                                          "compile": False, "device": "default"}},
        "2": {"class_type": "NewBieTextEncoderLoader", "inputs": {"gemma_name": GEMMA, "jina_name": JINA,
                                                                  "precision": "fp32", "device": "default"}},
        "3": {"class_type": "NewBieVAELoader", "inputs": {"vae_name": VAE, "precision": "fp32", "device": "default"}},
        "4": {"class_type": "NewBieTextEncode", "inputs": {"text_encoders": ["2", 0], "positive": "1girl, smile",
                                                           "negative": "lowres", "system_prompt": "auto",
                                                           "keep_loaded": False}},
    }


def our_sampler(latent=None, positive=("4", 0), negative=("4", 1), denoise=1.0, seed=1) -> dict:
    inputs = {"model": ["1", 0], "positive": list(positive), "negative": list(negative), "seed": seed, "steps": STEPS,
              "cfg": 4.0, "shift": 6.0, "solver": "euler", "cfg_trunc": 1.0, "renorm": 0.0, "width": SIZE,
              "height": SIZE, "batch_size": 1, "denoise": denoise}
    if latent is not None:
        inputs["latent"] = list(latent)
    return {"class_type": "NewBieDiTSampler", "inputs": inputs}


def decode_from(g: dict, src: str) -> dict:
    g["90"] = {"class_type": "NewBieVAEDecode", "inputs": {"vae": ["3", 0], "samples": [src, 0], "precision": "auto",
                                                           "tiled": False}}
    g["91"] = {"class_type": "SaveImage", "inputs": {"images": ["90", 0], "filename_prefix": f"io_{uuid.uuid4().hex[:8]}"}}
    return g


def run_ok(comfy, g: dict, size=(SIZE, SIZE)) -> dict:
    entry = comfy.run(g, timeout=180)
    (img,) = comfy.output_images(entry)
    assert png_size(comfy.view(**img)) == size
    return entry


def run_error(comfy, g: dict) -> str:
    entry = comfy.run(g, timeout=180, check=False)
    assert entry["status"]["status_str"] == "error", entry["status"]
    (err,) = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    return err["exception_message"]


def aura_flow(g: dict) -> dict:
    g["10"] = {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["1", 0], "shift": 6.0}}
    g["11"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}}
    return g


@pytest.fixture(scope="module", autouse=True)
def _models(comfy, example_image):  # noqa: F811 - the tiny models and the 64 px example picture in input/
    return comfy


# --------------------------------------------------------------------------- core samplers on our MODEL
def test_core_ksampler_with_aura_flow_shift(comfy):
    g = aura_flow(base_graph())
    g["12"] = {"class_type": "KSampler", "inputs": {"model": ["10", 0], "positive": ["4", 0], "negative": ["4", 1],
                                                    "latent_image": ["11", 0], "seed": 1, "steps": STEPS, "cfg": 5.5,
                                                    "sampler_name": "res_multistep", "scheduler": "simple",
                                                    "denoise": 1.0}}
    run_ok(comfy, decode_from(g, "12"))


def test_core_ksampler_advanced(comfy):
    g = aura_flow(base_graph())
    g["12"] = {"class_type": "KSamplerAdvanced", "inputs": {
        "model": ["10", 0], "add_noise": "enable", "noise_seed": 1, "steps": STEPS + 1, "cfg": 5.5,
        "sampler_name": "euler", "scheduler": "simple", "positive": ["4", 0], "negative": ["4", 1],
        "latent_image": ["11", 0], "start_at_step": 0, "end_at_step": 10000, "return_with_leftover_noise": "disable"}}
    run_ok(comfy, decode_from(g, "12"))


def test_core_sampler_custom_advanced(comfy):
    g = aura_flow(base_graph())
    g.update({
        "20": {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}},
        "21": {"class_type": "CFGGuider", "inputs": {"model": ["10", 0], "positive": ["4", 0], "negative": ["4", 1],
                                                     "cfg": 5.5}},
        "22": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "23": {"class_type": "BasicScheduler", "inputs": {"model": ["10", 0], "scheduler": "simple", "steps": STEPS,
                                                          "denoise": 1.0}},
        "24": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["20", 0], "guider": ["21", 0],
                                                                 "sampler": ["22", 0], "sigmas": ["23", 0],
                                                                 "latent_image": ["11", 0]}},
    })
    run_ok(comfy, decode_from(g, "24"))


# -------------------------------------------------------------- core latent nodes into our sampler
@pytest.mark.parametrize("node", ["EmptyLatentImage", "EmptySD3LatentImage"])
def test_empty_latents_into_our_sampler(comfy, node):
    g = base_graph()
    g["10"] = {"class_type": node, "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}}
    g["12"] = our_sampler(latent=("10", 0))
    run_ok(comfy, decode_from(g, "12"))


def _load_image(g: dict) -> dict:
    g["30"] = {"class_type": "LoadImage", "inputs": {"image": EXAMPLE_IMAGE}}
    return g


def test_newbie_encode_set_mask_upscale_into_our_sampler(comfy):
    g = _load_image(base_graph())
    g["31"] = {"class_type": "NewBieVAEEncode", "inputs": {"vae": ["3", 0], "pixels": ["30", 0], "precision": "auto",
                                                           "tiled": False}}
    g["32"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["31", 0], "mask": ["30", 1]}}
    g["33"] = {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["32", 0], "upscale_method": "nearest-exact",
                                                           "scale_by": 1.5}}
    g["12"] = our_sampler(latent=("33", 0), denoise=0.7)
    run_ok(comfy, decode_from(g, "12"), size=(96, 96))  # the 64 px example image, latent ×1.5


@pytest.mark.parametrize("encoder, denoise", [("VAEEncode", 0.5), ("VAEEncodeForInpaint", 1.0)])
def test_core_vae_encode_outputs_into_our_sampler(comfy, flux_arch_vae, encoder, denoise):  # noqa: F811
    g = _load_image(base_graph())
    g["34"] = {"class_type": "VAELoader", "inputs": {"vae_name": flux_arch_vae}}
    inputs = {"pixels": ["30", 0], "vae": ["34", 0]}
    if encoder == "VAEEncodeForInpaint":
        inputs.update(mask=["30", 1], grow_mask_by=6)
    g["35"] = {"class_type": encoder, "inputs": inputs}
    g["12"] = our_sampler(latent=("35", 0), denoise=denoise)
    run_ok(comfy, decode_from(g, "12"), size=(64, 64))


# --------------------------------------------------------- core conditioning nodes into our sampler
@pytest.mark.parametrize("node, inputs", [
    ("ConditioningZeroOut", {"conditioning": ["4", 1]}),
    ("ConditioningConcat", {"conditioning_to": ["4", 0], "conditioning_from": ["4", 1]}),
])
def test_conditioning_nodes_with_a_defined_result(comfy, node, inputs):
    g = base_graph()
    g["40"] = {"class_type": node, "inputs": inputs}
    g["12"] = our_sampler(positive=("40", 0) if node == "ConditioningConcat" else ("4", 0),
                          negative=("40", 0) if node == "ConditioningZeroOut" else ("4", 1))
    run_ok(comfy, decode_from(g, "12"))


@pytest.mark.parametrize("node, inputs, words", [
    ("ConditioningCombine", {"conditioning_1": ["4", 0], "conditioning_2": ["4", 1]}, "2 entries"),
    ("ConditioningSetTimestepRange", {"conditioning": ["4", 0], "start": 0.0, "end": 0.5}, "Timestep Range"),
])
def test_conditioning_nodes_refused_with_the_alternative(comfy, node, inputs, words):
    g = base_graph()
    g["40"] = {"class_type": node, "inputs": inputs}
    g["12"] = our_sampler(positive=("40", 0))
    msg = run_error(comfy, decode_from(g, "12"))
    assert words in msg and "core KSampler" in msg and "ModelSamplingAuraFlow" in msg, msg
