"""Full-size NewBie models with random weights, built on the GPU and handed to the pipeline as if read from disk.

No weights can be downloaded where the benchmark runs, and cost does not depend on weight values. Each model's
state dict is generated on the accelerator (fast), moved to the CPU in bf16 (the released files' dtype) and
then goes through the product's own builders (`load_dit`, `build_hf_model`, the VAE's `_build`), so the
benchmark measures the same modules, dtypes and code paths as a real run. `--quick` uses the tiny test models
written by `make-tiny` instead (a CPU smoke test of the benchmark itself).

Random values: matrices N(0, 1/fan_in), biases N(0, 0.05²), 1-D weights (norm scales) 1 + N(0, 0.1²):
activations stay finite through every layer in bf16.
"""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch

from ..dit import DiTConfig, NextDiT, load_dit
from ..loading import CPU_ONLY, STREAMED_BLOCKS, load_role
from ..memory import StagedModel
from ..model_paths import ModelPaths

DTYPE = torch.bfloat16
# google/gemma-3-4b-it text path and jina-clip-v2's XLM-RoBERTa-large text tower (spec §3).
GEMMA_SHAPES = dict(vocab_size=262_208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                    num_attention_heads=8, num_key_value_heads=4, head_dim=256)
JINA_SHAPES = dict(vocab_size=250_002, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                   intermediate_size=4096, type_vocab_size=1)
FLUX_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611,
                shift_factor=0.1159, force_upcast=True, use_quant_conv=False, use_post_quant_conv=False,
                mid_block_add_attention=True)


def random_state_dict(shapes: dict[str, torch.Size], device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """Random bf16 CPU tensors for `shapes`, generated on `device` (see the module docstring for the values)."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for k in sorted(shapes):
        shape = tuple(shapes[k])
        r = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
        if len(shape) >= 2:
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            t = r / fan_in ** 0.5
        elif k.endswith("bias"):
            t = r * 0.05
        else:
            t = 1.0 + 0.1 * r
        out[k] = t.to(DTYPE).cpu()
    return out


def _shapes(factory) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in factory().state_dict().items()}


def random_dit_state_dict(config: DiTConfig, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """`random_state_dict` for a NextDiT of `config` (official key layout), generated on `device`."""
    return random_state_dict(_shapes(lambda: NextDiT(config, device="meta")), device, seed)


def full_size_models(device: torch.device, tokenizer_paths: ModelPaths, seed: int = 0) -> dict[str, tuple]:
    """Random full-size DiT, Gemma3-4B text model, Jina v2 text tower and FLUX VAE (bf16, on the CPU).

    Tokenizers come from `tokenizer_paths` (the tiny set): token ids only need to be valid, not meaningful.
    """
    from diffusers import AutoencoderKL
    from transformers import Gemma3TextConfig, Gemma3TextModel

    from ..fp8 import make_fp8_capable
    from ..text.gemma import GEMMA3_4B_EXTRA, GemmaTextEncoder, load_gemma
    from ..text.hf import build_hf_model
    from ..text.jina import JinaTextEncoder, _jina_model_class, load_jina
    from ..vae import FluxVAE, _build

    out = {}
    cfg = DiTConfig.full()
    sd = random_dit_state_dict(cfg, device, seed)
    dit = load_dit(sd, dtype=DTYPE, device="cpu")
    out["dit"] = (dit, dit)

    gcfg = Gemma3TextConfig(**GEMMA_SHAPES, **GEMMA3_4B_EXTRA)
    gcfg._attn_implementation = "sdpa"
    sd = random_state_dict(_shapes(lambda: Gemma3TextModel(gcfg)), device, seed + 1)
    gemma = build_hf_model(Gemma3TextModel, gcfg, sd, DTYPE, "cpu", "random Gemma3-4B")
    make_fp8_capable(gemma)
    tok = load_gemma(tokenizer_paths.gemma, dtype=torch.float32).tokenizer
    out["gemma"] = (GemmaTextEncoder(gemma, tok, gcfg.hidden_size, "random"), gemma)

    Config, Model = _jina_model_class()
    jcfg = Config(**JINA_SHAPES, layer_norm_eps=1e-5, hidden_act="gelu", pad_token_id=1, bos_token_id=0,
                  eos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 20000.0})
    jcfg._attn_implementation = "sdpa"
    model_cls = functools.partial(Model, add_pooling_layer=False)
    sd = random_state_dict(_shapes(lambda: model_cls(jcfg)), device, seed + 2)
    jina = build_hf_model(model_cls, jcfg, sd, DTYPE, "cpu", "random Jina v2")
    jtok = load_jina(tokenizer_paths.jina, dtype=torch.float32).tokenizer
    out["jina"] = (JinaTextEncoder(jina, jtok, jcfg.hidden_size, "random"), jina)

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoencoderKL.from_config(FLUX_VAE).state_dict().items()}
    vae = _build(Path("random FLUX VAE"), FLUX_VAE, random_state_dict(shapes, device, seed + 3), DTYPE, "cpu")
    out["vae"] = (FluxVAE(vae), vae)
    return {role: (w, m) for role, (w, m) in out.items()}


def build_models(device: torch.device, quick: bool, seed: int = 0) -> tuple[dict[str, tuple], ModelPaths]:
    """{role: (wrapper, module)} — full size with random weights, or (quick) the tiny test models."""
    tiny_dir = Path(tempfile.mkdtemp(prefix="newbie-bench-tiny-"))
    from ..tiny import make_tiny

    make_tiny(tiny_dir)
    paths = ModelPaths.from_dir(tiny_dir)
    if quick:
        loaded = {r: load_role(r, paths) for r in ("dit", "gemma", "jina", "vae")}
        return {r: (lr.wrapper, lr.module) for r, lr in loaded.items()}, paths
    return full_size_models(device, paths, seed), paths


def staged_models(models: dict[str, tuple]) -> dict[str, tuple]:
    """{role: (wrapper, StagedModel)} with the product's CPU-only and streamed-block settings per role.

    One StagedModel per model for the whole benchmark: its pinned CPU copy is made once and shared by
    every pipeline mode (`Pipeline.adopt`).
    """
    return {r: (w, StagedModel(r, m, f"random {r}", CPU_ONLY.get(r, ()), STREAMED_BLOCKS.get(r, ())))
            for r, (w, m) in models.items()}
