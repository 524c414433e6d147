"""Golden parity of our NextDiT with the OFFICIAL `NextDiT_CLIP` (fp32, CPU).

How `data/dit_golden.safetensors` was produced (throwaway script in /tmp, not in the repo):
- official code: NewBieAI-Lab/NewBie-image-Exp0.1 commit 709e9a4 (709e9a482fb2b861ad6aa50dcafb0198cad66c1d),
  `models/model.py` + `models/components.py`, with a stub `flash_attn` module in `sys.modules` (the fp32
  path uses SDPA with a key mask and never calls flash); apex absent, so the vanilla RMSNorm (eps 1e-6
  default for q/k and the CLIP projection);
- model: `NextDiT_CLIP(patch_size=2, in_channels=16, dim=64, n_layers=2, n_refiner_layers=1, n_heads=4,
  n_kv_heads=2, multiple_of=16, norm_eps=1e-5, qk_norm=True, cap_feat_dim=64, axes_dims=[4,6,6],
  axes_lens=[1024,512,512], clip_text_dim=32)` in fp32, loaded `strict=True` with
  `newbie_core.tiny.dit.tiny_dit_state_dict(seed=0)` (the weights `write_tiny_dit(root, seed=0)` writes);
- inputs from `torch.Generator().manual_seed(42)`: x `[2,16,8,12]`, t = [0.3, 0.8], cap_feats `[2,8,64]`
  with cap_mask lengths 7 and 4 (right-padded, pads hold random features), clip_text_pooled `[2,32]`;
- outputs: `out = model(x, t, cap_feats, cap_mask, clip_text_pooled=pooled)` and
  `out_no_pooled = model(x, t, cap_feats, cap_mask)`.
The file's metadata stores the commit and the weights' abs-sum, checked below so that a change of the
tiny-weight generator is reported as such and not as a model regression.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from newbie_core.dit import load_dit
from newbie_core.tiny.dit import tiny_dit_state_dict

GOLDEN = Path(__file__).parent / "data" / "dit_golden.safetensors"


@pytest.fixture(scope="module")
def golden():
    with safe_open(str(GOLDEN), "pt") as f:
        meta = f.metadata()
    return load_file(str(GOLDEN)), meta


@pytest.fixture(scope="module")
def model(golden):
    sd = tiny_dit_state_dict(0)
    _, meta = golden
    fp = sum(float(v.double().abs().sum()) for v in sd.values())
    assert abs(fp - float(meta["weights_abs_sum"])) < 1e-6 * fp, "tiny weight generator changed: regenerate golden"
    return load_dit(sd, dtype=torch.float32)


@pytest.mark.parametrize("pooled", [True, False])
def test_matches_official(golden, model, pooled):
    g, meta = golden
    assert meta["official_commit"].startswith("709e9a4")
    with torch.no_grad():
        out = model(g["x"], g["t"], g["cap_feats"], g["cap_mask"], g["clip_text_pooled"] if pooled else None)
    ref = g["out"] if pooled else g["out_no_pooled"]
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert (out - ref).abs().max().item() < 1e-4
    assert ref.abs().mean() > 0.1  # non-trivial reference


def test_matches_official_with_prepared_layout(golden, model):
    g, _ = golden
    layout = model.prepare(g["cap_mask"], *g["x"].shape[-2:])
    with torch.no_grad():
        out = model(g["x"], g["t"], g["cap_feats"], g["cap_mask"], g["clip_text_pooled"], layout=layout)
    assert (out - g["out"]).abs().max().item() < 1e-4
