"""The stable public API other checks rely on: newbie_core.load_dit and the DiT call convention."""
import torch

import newbie_core


def test_every_exported_name_resolves():
    for name in newbie_core.__all__:
        assert getattr(newbie_core, name) is not None


def test_load_dit_and_call_in_the_official_convention(tiny_models):
    dit = newbie_core.load_dit(str(tiny_models["dit_hf"]), dtype=torch.float32, device="cpu")
    cfg = dit.config
    x = torch.randn(2, 16, 8, 8)
    t = torch.tensor([0.0, 0.7])
    feats = torch.randn(2, 5, cfg.cap_feat_dim)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    pooled = torch.randn(2, cfg.clip_text_dim)
    v = dit(x, t, feats, mask, pooled)
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
    sd = {k: v.clone() for k, v in dit.state_dict().items()}
    again = newbie_core.load_dit(sd, dtype=torch.float32)
    assert torch.equal(again(x, t, feats, mask, pooled), v), "a state dict source loads the same model"
