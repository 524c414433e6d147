"""Image tensors ↔ PNG files (with the generation settings in the PNG's text chunks)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """[B,3,H,W] floats in [0,1] → uint8 array [B,H,W,3] (values clamped, rounded)."""
    x = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_png(images: torch.Tensor, out: str | Path, metadata: dict | None = None) -> list[Path]:
    """Write each image of the batch as PNG; `out` as given for batch 1, `stem_i.png` otherwise."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    arr = to_uint8_hwc(images)
    info = PngInfo()
    if metadata:
        info.add_text("newbie", json.dumps(metadata, default=str))
    paths = [out] if len(arr) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix or '.png'}") for i in range(len(arr))]
    for a, p in zip(arr, paths):
        Image.fromarray(a).save(p, pnginfo=info)
    return paths
