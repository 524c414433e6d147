"""Run INSIDE the ComfyUI-NewBie 0.4.0 fork's Python (its venv), in-process: both CONDITIONING directions.

    python fork_probe.py FORK_DIR OUT.json

1. Our CONDITIONING → the fork's native NewBie MODEL (`supported_models.NewBieImageModel` → `model_base.NewBieImage`,
   `comfy.ldm.newbie`), built at the tiny size from the same tiny weights as our DiT, sampled by core
   `comfy.sample.sample`; compared with our MODEL sampled the same way. Also without the `clip_text_pooled` key
   (what the native model reads) to show it matters.
2. The fork's / upstream's CONDITIONING layouts → our NewBie DiT Sampler (node execute), compared with our layout.
Writes the measured numbers as JSON; tests/fork040/test_fork040.py asserts on them.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACK = "newbie_pack_in_fork040"


def main(fork_dir: str, out: str) -> None:
    sys.path.insert(0, fork_dir)
    from comfy.cli_args import args

    args.cpu = True
    import comfy.model_management  # noqa: F401
    import comfy.sample
    import comfy.supported_models
    import comfy.model_patcher
    import comfyui_version
    import nodes  # noqa: F401
    import torch

    spec = importlib.util.spec_from_file_location(PACK, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = pack
    spec.loader.exec_module(pack)
    for sub in ("nodes", "nodes._comfy", "nodes.sampler", "nodes.text_encode"):
        importlib.import_module(f"{PACK}.{sub}")
    core, glue = pack.newbie_core, pack.nodes

    tmp = Path(tempfile.mkdtemp(prefix="fork040_"))
    from newbie_core.tiny import make_tiny
    files = make_tiny(tmp)
    dit_file = files["dit_comfyui"]
    prec = core.precision.parse_precision("fp32", "dit", torch.device("cpu"))
    ours = glue._comfy.load_dit_patcher(Path(dit_file), prec, "sdpa")
    cfg = ours.model.diffusion_model.config

    # --- the fork's native model at the tiny size, same weights
    ffn_mult = (cfg.ffn_hidden_dim + 0.5) / cfg.dim  # comfy's FeedForward: int(mult · dim), multiple_of 1
    unet_config = {"image_model": "NewBieImage", "model_type": "newbie_dit", "patch_size": cfg.patch_size,
                   "in_channels": cfg.in_channels, "dim": cfg.dim, "n_layers": cfg.n_layers,
                   "n_refiner_layers": cfg.n_refiner_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
                   "multiple_of": 1, "ffn_dim_multiplier": ffn_mult, "norm_eps": cfg.norm_eps, "qk_norm": True,
                   "cap_feat_dim": cfg.cap_feat_dim, "axes_dims": list(cfg.axes_dims),
                   "axes_lens": list(cfg.axes_lens), "rope_theta": cfg.rope_theta,
                   "clip_text_dim": cfg.clip_text_dim, "clip_img_dim": cfg.clip_text_dim}
    mc = comfy.supported_models.NewBieImageModel(unet_config)
    mc.set_inference_dtype(torch.float32, None)
    native = mc.get_model({})
    sd = {k: v.float() for k, v in ours.model.diffusion_model.state_dict().items()}
    result = native.diffusion_model.load_state_dict(sd, strict=False)
    native_patcher = comfy.model_patcher.ModelPatcher(native, torch.device("cpu"), torch.device("cpu"))

    g = torch.Generator().manual_seed(0)
    def emb(n_tokens):
        feats = torch.randn(1, 8, cfg.cap_feat_dim, generator=g)
        mask = (torch.arange(8) < n_tokens).long()[None]
        return core.text.encode.PromptEmbeddings(cap_feats=feats, cap_mask=mask,
                                                 pooled=torch.randn(1, cfg.clip_text_dim, generator=g))
    pos, neg = glue.text_encode.to_conditioning(emb(8)), glue.text_encode.to_conditioning(emb(8))
    latent = torch.zeros(1, 16, 4, 4)
    noise = comfy.sample.prepare_noise(latent, 3)

    def core_sample(patcher, p, n):
        return comfy.sample.sample(patcher, noise, 3, 4.0, "euler", "simple", p, n, latent, denoise=1.0,
                                   disable_noise=False, seed=3).float()

    out_ours = core_sample(ours, pos, neg)
    out_native = core_sample(native_patcher, pos, neg)
    strip = lambda c: [[c[0][0], {k: v for k, v in c[0][1].items() if k != "clip_text_pooled"}]]  # noqa: E731
    out_native_no_key = core_sample(native_patcher, strip(pos), strip(neg))

    # --- the fork's / upstream's CONDITIONING layouts into our sampler
    def our_sampler(p, n):
        return glue.sampler.NewBieDiTSampler.execute(
            model=ours, positive=p, negative=n, seed=5, steps=3, cfg=4.0, shift=6.0, solver="euler", cfg_trunc=1.0,
            renorm=0.0, width=32, height=32, batch_size=1).args[0]["samples"]
    fork_layout = lambda c: [[c[0][0], {"cap_feats": c[0][0], "cap_mask": c[0][1]["attention_mask"].bool(),  # noqa: E731
                                        "clip_text_pooled": c[0][1]["pooled_output"]}]]
    upstream_layout = lambda c: [[c[0][0], {"attention_mask": c[0][1]["attention_mask"],  # noqa: E731
                                            "pooled_output": c[0][1]["pooled_output"]}]]
    s_ours = our_sampler(pos, neg)
    s_fork = our_sampler(fork_layout(pos), fork_layout(neg))
    s_up = our_sampler(upstream_layout(pos), upstream_layout(neg))

    rel = lambda a, b: float((a - b).abs().max() / b.abs().max())  # noqa: E731
    report = {
        "comfyui_version": comfyui_version.__version__,
        "native_class": type(native).__name__, "native_dit_class": type(native.diffusion_model).__name__,
        "missing_keys": list(result.missing_keys), "unexpected_keys": list(result.unexpected_keys),
        "native_vs_ours_rel": rel(out_native, out_ours),
        "native_without_clip_text_pooled_rel": rel(out_native_no_key, out_ours),
        "sampler_fork_layout_equal": bool(torch.equal(s_fork, s_ours)),
        "sampler_upstream_layout_equal": bool(torch.equal(s_up, s_ours)),
        "finite": bool(torch.isfinite(out_native).all() and torch.isfinite(s_ours).all()),
    }
    Path(out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
