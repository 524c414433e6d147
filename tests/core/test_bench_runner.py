"""The GPU benchmark's own machinery on the CPU: the naive baseline's DiT is injected (never a switched product
model), and `newbie bench --quick` runs end to end with every parity check passing."""
from __future__ import annotations

import json

import torch

from newbie_core.bench.runner import reference_dit
from newbie_core.dit import load_dit
from newbie_core.memory import StagedModel
from newbie_core.ops import RMSNorm
from newbie_core.precision import parse_precision
from newbie_core.tiny.dit import write_tiny_dit


def test_reference_dit_shares_the_weights_and_injects_the_reference_arithmetic(tmp_path):
    dit = load_dit(write_tiny_dit(tmp_path, seed=0)["dit_hf"], dtype=torch.bfloat16)
    ref = reference_dit(dit)
    assert dit.packed_attention and not ref.packed_attention  # masked SDPA over the padded batch
    norms = [m for m in ref.modules() if isinstance(m, RMSNorm)]
    assert norms and not any(m.fused for m in norms)
    assert all(m.fused for m in dit.modules() if isinstance(m, RMSNorm)), "the product model is left as it was"
    own = dict(dit.named_parameters())
    assert all(p is own[name] for name, p in ref.named_parameters())  # the same Parameter objects
    staged = StagedModel("dit", dit)
    staged.acquire("cpu", parse_precision("fp32", "dit"))  # placing the product's weights places the reference's
    assert all(p.dtype == torch.float32 for p in ref.parameters())
    g = torch.Generator().manual_seed(0)
    cfg = dit.config
    x, t = torch.randn(2, 16, 8, 8, generator=g), torch.rand(2, generator=g)
    feats, pooled = torch.randn(2, 6, cfg.cap_feat_dim, generator=g), torch.randn(2, cfg.clip_text_dim, generator=g)
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    with torch.no_grad():  # fp32: the two arithmetics agree to float rounding
        torch.testing.assert_close(ref(x, t, feats, mask, pooled), dit(x, t, feats, mask, pooled), rtol=1e-4, atol=1e-5)


def test_bench_quick_runs_end_to_end_with_every_parity_check_passing(tmp_path):
    from newbie_core.bench.report import check_parity
    from newbie_core.cli import main

    assert main(["bench", "--quick", "--device", "cpu", "--out", str(tmp_path)]) in (0, None)
    result = json.loads(next(tmp_path.glob("bench-*.json")).read_text())
    assert set(result["generation"]) >= {"naive", "staged_bf16", "fp8", "lowvram", "compile"}
    assert "naive_eager_bf16" in result["dit_step"] and check_parity(result) == []
    assert next(tmp_path.glob("bench-*.png")).read_bytes()[:4] == b"\x89PNG"
