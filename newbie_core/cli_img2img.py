"""`newbie generate --init-image FILE --denoise X [--mask FILE]`: img2img and inpainting on the command line.

The init image sets the size when --width/--height are not given (centre-cropped to multiples of 16); with them
it is resized to that size. The mask is a picture of the same image: white = repaint, black = keep (grey blends;
an alpha channel is ignored, its luminance counts). --denoise defaults to 0.6 with an init image, 1 without.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import InputError

DEFAULT_SIZE = 1024
DEFAULT_IMG2IMG_DENOISE = 0.6


def add_arguments(p) -> None:
    """Add --init-image / --denoise / --mask to the `generate` parser."""
    p.add_argument("--init-image", metavar="FILE", help="start from this picture (img2img; PNG/JPEG/WebP)")
    p.add_argument("--denoise", type=float, default=None,
                   help="fraction of the schedule to run from the init image, 0-1 (ComfyUI's meaning; default "
                        f"{DEFAULT_IMG2IMG_DENOISE} with --init-image, 1 = from pure noise)")
    p.add_argument("--mask", metavar="FILE", help="inpainting mask for --init-image: white = repaint, black = keep")


def _open(path: str, what: str, mode: str):
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} {p} does not exist: give the path of a PNG/JPEG/WebP picture.")
    try:
        with Image.open(p) as im:
            return im.convert(mode)
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"{what} {p} is not a readable picture ({e}); save it as PNG and try again.") from e


def _to_tensor(im) -> torch.Tensor:
    import numpy as np

    arr = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)
    return (arr[..., None] if arr.ndim == 2 else arr).permute(2, 0, 1)[None]  # [1,C,H,W]


def prepare(args) -> dict:
    """Fill args.width/height/denoise and return the `Pipeline.generate` keywords (init_image, mask)."""
    from .img2img import crop_to_multiple

    if args.init_image is None:
        if args.mask:
            raise InputError("--mask needs --init-image (the picture to repaint).")
        if args.denoise is not None and args.denoise < 1.0:
            raise InputError("--denoise below 1 needs --init-image (the picture to start from).")
        args.width, args.height, args.denoise = args.width or DEFAULT_SIZE, args.height or DEFAULT_SIZE, 1.0
        return {}
    from PIL import Image

    im = _open(args.init_image, "--init-image", "RGB")
    if args.width or args.height:
        w = args.width or round(im.width * args.height / im.height / 16) * 16
        h = args.height or round(im.height * args.width / im.width / 16) * 16
        im = im.resize((max(16, w), max(16, h)), Image.LANCZOS)
    image = crop_to_multiple(_to_tensor(im))
    args.height, args.width = image.shape[-2:]
    args.denoise = DEFAULT_IMG2IMG_DENOISE if args.denoise is None else args.denoise
    out = {"init_image": image}
    if args.mask:
        m = _open(args.mask, "--mask", "L")
        if m.size != im.size:
            m = m.resize(im.size, Image.BILINEAR)
        out["mask"] = crop_to_multiple(_to_tensor(m))[0, 0]
    return out
