"""`DiTConfig`: the NextDiT_CLIP hyper-parameters (its own module: `checkpoints` infers it from tensor shapes
and `dit` builds the model from it, neither importing the other for it)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DiTConfig:
    """Hyper-parameters of a NextDiT_CLIP. Defaults = the official 3.5B model (`DiTConfig.full()`)."""

    patch_size: int = 2
    in_channels: int = 16
    dim: int = 2304
    n_layers: int = 36
    n_refiner_layers: int = 2
    n_heads: int = 24
    n_kv_heads: int = 8
    ffn_hidden_dim: int = 9216
    norm_eps: float = 1e-5
    qk_norm_eps: float = 1e-6  # q/k and CLIP-projection RMSNorms use the class default (spec §1.3)
    cap_feat_dim: int = 2560
    clip_text_dim: int = 1024
    adaln_dim: int = 1024
    axes_dims: tuple[int, ...] = (32, 32, 32)
    axes_lens: tuple[int, ...] = (1024, 512, 512)
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        self.axes_dims = tuple(int(a) for a in self.axes_dims)
        self.axes_lens = tuple(int(a) for a in self.axes_lens)
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim {self.dim}, heads {self.n_heads}, kv heads {self.n_kv_heads} do not divide.")
        if sum(self.axes_dims) != self.head_dim or any(a % 2 for a in self.axes_dims) or len(self.axes_dims) != 3:
            raise ValueError(f"axes_dims {self.axes_dims} must be 3 even widths summing to head_dim {self.head_dim}.")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.dim // self.n_heads

    @property
    def out_channels(self) -> int:
        """Output latent channels (= input channels)."""
        return self.in_channels

    @classmethod
    def full(cls) -> "DiTConfig":
        """The official NewBie-image-Exp0.1 config (NextDiT_3B_GQA_patch2_Adaln_Refiner_WHIT_CLIP)."""
        return cls()

    @staticmethod
    def ffn_hidden(dim: int, multiple_of: int = 256, multiplier: float | None = None) -> int:
        """The official FFN width rule: `roundup_multiple_of(int(multiplier·4·dim))`."""
        h = 4 * dim if multiplier is None else int(multiplier * 4 * dim)
        return multiple_of * ((h + multiple_of - 1) // multiple_of)
