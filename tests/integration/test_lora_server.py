"""LoRA in a real ComfyUI server: the bundled newbie_lora workflow with NewBie LoRA Loader, the same graph at
strength 0, and with core LoraLoaderModelOnly in the LoRA node's place (our key map makes core map LoKr keys)."""
from __future__ import annotations

import copy
import io

import numpy as np
from PIL import Image

from test_workflows import nodes_of, workflow_api


def _run(comfy, api) -> tuple[dict, np.ndarray]:
    entry = comfy.run(api, timeout=180)
    (img,) = comfy.output_images(entry)
    return entry, np.asarray(Image.open(io.BytesIO(comfy.view(**img))).convert("RGB"), dtype=np.float32)


def test_lora_workflow_with_our_node_and_core_loader(comfy):
    api, _ = workflow_api(comfy, "newbie_lora")
    (lora,) = nodes_of(api, "NewBieLoraLoader")
    (sampler,) = nodes_of(api, "NewBieDiTSampler")
    api[sampler]["inputs"]["seed"] = 7
    name = api[lora]["inputs"]["lora_name"]

    entry, ours = _run(comfy, api)
    text = entry["outputs"][lora]["text"][0]
    assert name in text and "LyCORIS LoKr" in text and "31 modules matched" in text and "NOT matched" not in text

    off = copy.deepcopy(api)
    off[lora]["inputs"]["strength"] = 0.0
    _, plain = _run(comfy, off)

    core = copy.deepcopy(api)
    core[lora] = {"class_type": "LoraLoaderModelOnly",
                  "inputs": {"model": api[lora]["inputs"]["model"], "lora_name": name, "strength_model": 1.0}}
    _, by_core = _run(comfy, core)

    effect = np.abs(ours - plain).mean()
    assert effect > 1.0, f"the LoRA changed the image by only {effect:.3f}/255 on average"
    # core's LoKr formula (kron, alpha / rank) on our key map gives the same weights up to fp32 summation order
    assert np.abs(by_core - ours).mean() < 0.1 * effect
