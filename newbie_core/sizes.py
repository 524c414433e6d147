"""The one size rule: image sizes are positive multiples of 16 px (VAE factor 8 × DiT patch 2); every size
message suggests `nearest_valid_size` (a tie goes to the smaller size)."""
from __future__ import annotations

import math

from .errors import InputError

VAE_FACTOR = 8  # pixels per latent cell (FLUX VAE)
SIZE_MULTIPLE = 16  # pixels: VAE_FACTOR × DiT patch 2


def nearest_valid_size(px: float, multiple: int = SIZE_MULTIPLE) -> int:
    """The multiple of `multiple` nearest to `px`, at least `multiple`. The one rounding rule of every size
    message: a tie goes to the SMALLER size (1000 → 992, 72 → 64), which needs less memory and can never pass
    the model's position table."""
    lo = math.floor(float(px) / multiple) * multiple
    hi = lo + multiple
    return int(max(multiple, hi if float(px) - lo > hi - float(px) else lo))


def validate_size(width: int, height: int) -> tuple[int, int]:
    """Check an image size (pixels): both > 0 and multiples of 16; raise InputError naming the nearest valid size."""
    nearest = nearest_valid_size

    bad = [f"{name} {v}" for name, v in (("width", width), ("height", height))
           if isinstance(v, bool) or not float(v).is_integer() or v <= 0 or int(v) % 16]
    if bad:
        raise InputError(
            f"Image size {width}×{height} is not valid ({', '.join(bad)}): width and height must be positive "
            f"multiples of 16. Nearest valid size: {nearest(width)}×{nearest(height)}."
        )
    return int(width), int(height)
