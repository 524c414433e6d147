"""The staged pipeline: text-encode → sample → decode, each stage holding only its own model on the device.

    pipe = Pipeline(ModelPaths.from_dir("NewBie-image-Exp0.1"), precision={"dit": "bf16", "vae": "fp32"})
    result = pipe.generate("1girl, smile", settings=GenerationSettings(width=1024, height=1024, seed=1))
    result.images  # [B,3,H,W] float32 in [0,1], CPU;  result.ledger.table()

Every stage loads its model onto the device for its work and releases it afterwards (unless `keep_loaded`),
and records wall time and peak memory in the ledger. Prompt embeddings are cached, so a repeated prompt
never loads the text encoders again.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from .errors import ModelFileError
from .files import fingerprint_or_none, loaded_fingerprint
from .validate import parse_device
from .fp8 import enable_fp8_matmul, fp8_matmul_supported
from .memory import EmbeddingCache, Ledger, StagedModel, default_device, empty_device_cache, file_identity, is_out_of_memory
from .model_paths import ModelPaths
from .precision import Precision, check_finite, parse_precision
from .recovery import out_of_memory_error, release_failure
from .sampling import GuidedVelocity, make_noise, sample, validate_size
from .text.encode import PromptEmbeddings, concat_embeddings, encode_cached
from .text.prompts import SYSTEM_PROMPTS
from .vae import LATENT_CHANNELS, VAE_SCALE_FACTOR

log = logging.getLogger(__name__)
STAGE_NAMES = {"text": "text encoding", "dit": "DiT sampling", "vae": "VAE decode"}  # as the nodes name them
# What the user can change when a stage runs out of memory (command line / Python API spelling).
LOW_VRAM_HINTS = {
    "text": "Lower-memory options: fp8_e4m3fn text precision (--precision text=fp8_e4m3fn), the low-VRAM mode "
            "(--lowvram: streams the encoder's layers, under 2 GiB), or a shorter prompt.",
    "dit": "Lower-memory options: fp8_e4m3fn DiT precision (--precision dit=fp8_e4m3fn, under 4 GiB), the low-VRAM "
           "mode (--lowvram: streams DiT blocks, under 2 GiB at 1024²), a smaller image, or batch 1.",
    "vae": "Lower-memory options: tiled decoding (--tiled-decode, also part of --lowvram), or a smaller image.",
}


@dataclass
class GenerationSettings:
    """Sampling settings. Defaults follow the official demo.py (18 grid points, midpoint, CFG 5, shift 6).

    `steps` counts grid points as in the official code: N steps → N−1 intervals; euler evaluates the model
    once per interval, midpoint twice. `cfg_trunc`: guidance only while t < cfg_trunc (t: 0 noise → 1 data);
    ≥ 1 guides every step. `renorm` > 0 caps the guided velocity's norm at renorm × the cond velocity's norm.
    """

    width: int = 1024
    height: int = 1024
    steps: int = 18
    cfg: float = 5.0
    shift: float = 6.0
    solver: str = "midpoint"
    cfg_trunc: float = 0.25
    renorm: float = 0.0
    seed: int = 0
    batch: int = 1


@dataclass
class GenerationResult:
    """What `Pipeline.generate` returns: images [B,3,H,W] in [0,1], the scaled latents, and the ledger."""

    images: torch.Tensor
    latents: torch.Tensor
    ledger: Ledger
    notes: list[str] = field(default_factory=list)


def guided_velocity(forward: Callable, dit, cond: PromptEmbeddings, uncond: PromptEmbeddings, batch: int,
                    device: torch.device, dtype: torch.dtype, height: int, width: int,
                    cfg: float, cfg_trunc: float, renorm: float) -> GuidedVelocity:
    """The CFG velocity the sampler integrates: the [cond] and [cond; uncond] batches are built, placed on
    `device` in `dtype` and given their DiT layouts (`dit.prepare`, one host sync) once per generation.

    `forward(x, t, cap_feats, cap_mask, pooled, layout=...)` is the DiT's official forward (or a compiled one);
    `height`/`width` are latent sizes. Raises ModelFileError when the embeddings do not fit the DiT.
    """
    check_conditioning(dit.config, cond, uncond)
    batches = {}
    for guided, items in ((False, [cond] * batch), (True, [cond] * batch + [uncond] * batch)):
        emb = concat_embeddings(items)
        mask = emb.cap_mask.to(device)
        batches[guided] = (emb.cap_feats.to(device, dtype), mask, emb.pooled.to(device, dtype),
                           dit.prepare(mask, height, width))

    def model_call(x: torch.Tensor, t: torch.Tensor, guided: bool) -> torch.Tensor:
        feats, mask, pooled, layout = batches[guided]
        return forward(x.to(device, dtype), t.to(device), feats, mask, pooled, layout=layout).float()

    return GuidedVelocity(model_call, cfg, cfg_trunc, renorm)


def check_conditioning(config, *embeddings: PromptEmbeddings) -> None:
    """Raise ModelFileError when prompt embeddings do not fit a DiT `config`: the caption features must be
    `cap_feat_dim` wide (Gemma's hidden size) and the pooled vector `clip_text_dim` wide (Jina's)."""
    for e in embeddings:
        width = int(e.cap_feats.shape[-1])
        if width != config.cap_feat_dim:
            raise ModelFileError(
                f"The prompt features are {width} wide, but this DiT expects {config.cap_feat_dim} (its caption "
                f"width = the hidden size of the Gemma it was trained with; NewBie-Image-Exp0.1: Gemma3-4B-it, 2560). "
                f"The text encoders do not belong to this DiT: load gemma_3_4b_it_bf16.safetensors (or NewBie's "
                f"text_encoder/ folder) in the text encoder loader.")
        pooled = None if e.pooled is None else int(e.pooled.shape[-1])
        if pooled is not None and pooled != config.clip_text_dim:
            raise ModelFileError(
                f"The pooled text vector is {pooled} wide, but this DiT expects {config.clip_text_dim} (Jina CLIP v2: "
                f"1024). The second text encoder does not belong to this DiT: load jina_clip_v2_bf16.safetensors "
                f"(or NewBie's clip_model/ folder).")


class Pipeline:
    """NewBie-image-Exp0.1 as three stages with per-stage precision; see the module docstring."""

    def __init__(self, paths: ModelPaths, device: torch.device | str | None = None,
                 precision: dict[str, str] | None = None, keep_loaded: bool = False, attention: str = "auto",
                 cache: EmbeddingCache | None = None, lowvram: bool = False, vram_budget: int | None = None,
                 compile: bool = False, fp8_matmul: bool = True):
        """`lowvram`: stream DiT/Gemma/Jina blocks from CPU memory and decode in tiles (peak < 2 GiB at 1024²);
        `vram_budget`: bytes of blocks low-VRAM mode may keep resident (None: stream all). `compile`:
        torch.compile the DiT forward (not with lowvram). `fp8_matmul`: under fp8 DiT precision, use fp8
        tensor-core matmuls where the GPU has them (else fp8 is storage only)."""
        self.paths = paths
        self.lowvram, self.vram_budget, self.compile, self.fp8_matmul = lowvram, vram_budget, compile, fp8_matmul
        self._compiled: tuple[object, Callable] | None = None  # (the DiT, its compiled forward)
        self.device = parse_device(device) or default_device()  # 'cuda:7', 'garbage': InputError, not a KeyError later
        self.precision_names = {"dit": "bf16", "text": "bf16", "vae": "auto", **(precision or {})}
        self.keep_loaded = keep_loaded
        self.attention = attention
        self.cache = cache if cache is not None else EmbeddingCache()
        self.ledger = Ledger()
        self._models: dict[str, StagedModel] = {}
        self._wrappers: dict[str, object] = {}

    # ---------------------------------------------------------------- models
    def precision(self, stage: str) -> Precision:
        """The resolved precision of `stage` (`dit`, `gemma`, `jina`, `vae`) on this pipeline's device."""
        name = self.precision_names["text" if stage in ("gemma", "jina") else stage]
        return parse_precision(name, stage, self.device)

    def set_precision(self, stage: str, name: str) -> None:
        """Change a stage's precision; the next use re-casts from the kept CPU copy (no disk read)."""
        parse_precision(name, stage, self.device)
        self.precision_names[stage] = name

    def _load(self, role: str) -> StagedModel:
        if role not in self._models:
            from .loading import load_role
            loaded = load_role(role, self.paths, attention=self.attention)
            self._wrappers[role] = loaded.wrapper
            self._models[role] = StagedModel(role, loaded.module, loaded.source, loaded.cpu_only, loaded.stream)
            self._models[role].fingerprint = fingerprint_or_none(loaded.source)
        return self._models[role]

    def adopt(self, role: str, wrapper, staged: StagedModel) -> None:
        """Use an already built model for `role` instead of reading its file (benchmarks, custom loaders).

        `wrapper` is what the stage calls (encoder, DiT, FluxVAE); `staged` manages its weights.
        """
        self._wrappers[role], self._models[role] = wrapper, staged

    def _acquire(self, role: str):
        staged = self._load(role)
        precision = self.precision(role)
        staged.acquire(self.device, precision, streaming=self.lowvram, budget=self.vram_budget)
        if role == "dit" and precision.is_fp8 and self.fp8_matmul and fp8_matmul_supported(self.device):
            enable_fp8_matmul(staged.module)
        return self._wrappers[role]

    def _dit_forward(self, dit) -> Callable:
        """The DiT's forward, compiled once per model when `compile` is on (static shapes, no graph breaks)."""
        if not self.compile or self.lowvram:
            return dit
        if self._compiled is None or self._compiled[0] is not dit:
            self._compiled = (dit, torch.compile(dit, fullgraph=True, dynamic=False))
        return self._compiled[1]

    def _done_with(self, role: str, clear_cache: bool = True) -> None:
        if not self.keep_loaded and role in self._models:
            self._models[role].release(clear_cache=clear_cache)

    def release_all(self) -> None:
        """Move every model back to its CPU copy and clear the device cache."""
        for m in self._models.values():
            m.release()
        empty_device_cache(self.device)

    def unload_all(self) -> None:
        """Forget every loaded model (CPU copies too) and the embedding cache."""
        self.release_all()
        self._models.clear()
        self._wrappers.clear()
        self._compiled = None  # the compiled wrapper holds the DiT: drop it with the model
        self.cache.clear()
        empty_device_cache(self.device)

    def describe_models(self) -> list[dict]:
        """Every model the pipeline holds, with device, dtype and size."""
        return [m.describe() for m in self._models.values()]

    # ---------------------------------------------------------------- stages
    @contextmanager
    def _on_device(self, role: str, clear_cache: bool = True):
        """The role's wrapper with its weights on the device; released afterwards (also on failure) unless
        keep_loaded. `clear_cache=False` skips emptying the device cache (the next model reuses the blocks)."""
        try:
            yield self._acquire(role)
        finally:
            self._done_with(role, clear_cache)

    def encode(self, prompts: list[str], system_prompt: str = SYSTEM_PROMPTS["xml"]) -> list[PromptEmbeddings]:
        """Encode prompts (each batch 1, on the CPU), through the embedding cache; the text stage."""
        identity = (*(loaded_fingerprint(self._models.get(r), getattr(self.paths, r, None)) for r in ("gemma", "jina")),
                    self.precision_names["text"])  # the content of what is (or will be) loaded
        try:
            embs, encoded = encode_cached(prompts, system_prompt, self.cache, identity,
                                          lambda: self._on_device("gemma", clear_cache=False),  # Jina reuses it
                                          lambda: self._on_device("jina"),  # one cache clear per text stage
                                          precision=self.precision("gemma"),
                                          around=lambda: self.ledger.stage("text", self.device))
        except BaseException as e:
            self._fail("text", e)
        if encoded:
            self.ledger.records[-1].notes.append(f"{encoded} encoded, {len(prompts) - encoded} from cache")
        return embs

    def sample(self, cond: PromptEmbeddings, uncond: PromptEmbeddings, settings: GenerationSettings,
               callback: Callable | None = None, latents: torch.Tensor | None = None) -> torch.Tensor:
        """Run the sampler; returns scaled latents [B,16,H/8,W/8] (fp32, CPU); the DiT stage."""
        validate_size(settings.width, settings.height)
        b = settings.batch
        noise = latents if latents is not None else make_noise(
            settings.seed, b, settings.height // VAE_SCALE_FACTOR, settings.width // VAE_SCALE_FACTOR, LATENT_CHANNELS)
        with self.ledger.stage("dit", self.device) as rec:
            try:
                x = self._sample_on_device(cond, uncond, settings, noise, callback)
            except BaseException as e:
                self._fail("dit", e)
            finally:
                self._done_with("dit")
            rec.notes.append(f"{settings.steps} steps {settings.solver}, cfg {settings.cfg}")
        return x

    def _sample_on_device(self, cond, uncond, settings: GenerationSettings, noise: torch.Tensor,
                          callback: Callable | None) -> torch.Tensor:
        # Its own frame: on failure every device tensor of the run (embedding copies, latents) is a local here,
        # and `_fail` frees them all (recovery.release_failure) before the error leaves the pipeline.
        dit = self._acquire("dit")
        velocity = guided_velocity(self._dit_forward(dit), dit, cond, uncond, settings.batch, self.device, self.precision("dit").compute,
                                   noise.shape[-2], noise.shape[-1], settings.cfg, settings.cfg_trunc, settings.renorm)
        x = sample(velocity, noise.to(self.device), settings.steps, settings.solver, settings.shift, callback)
        check_finite(x, "DiT sampling", self.precision("dit"))
        return x.float().cpu()

    def decode(self, latents: torch.Tensor, tiled: bool = False) -> tuple[torch.Tensor, list[str]]:
        """Decode scaled latents to images [B,3,H,W] in [0,1] (fp32, CPU); the VAE stage. Returns notes too."""
        notes: list[str] = []
        tiled = tiled or self.lowvram
        with self.ledger.stage("vae", self.device) as rec:
            try:
                vae = self._acquire("vae")
                if tiled:
                    images, used_tiled = vae.decode(latents.to(self.device), tiled=True), True
                else:
                    images, used_tiled = vae.decode_with_fallback(latents.to(self.device))
                if used_tiled and not tiled:
                    notes.append("out of memory in full decode: decoded in tiles instead")
                check_finite(images, "VAE decode", self.precision("vae"))
                images = images.float().cpu()
            except BaseException as e:
                self._fail("vae", e)
            finally:
                self._done_with("vae")
            rec.notes.extend(notes or (["tiled"] if tiled else []))
        return images, notes

    def _fail(self, stage: str, exc: BaseException):
        """Release everything a failed stage held (models, its frames' tensors, the device cache); turn OOM
        into an error that lists the lower-memory options; re-raise. The pipeline stays usable."""
        for m in self._models.values():
            m.release(clear_cache=False)
        release_failure(exc, self.device)
        if is_out_of_memory(exc):
            raise out_of_memory_error(STAGE_NAMES[stage], self.device, LOW_VRAM_HINTS[stage]) from exc
        raise exc

    def generate(self, prompt: str, negative: str = "", settings: GenerationSettings | None = None,
                 system_prompt: str = SYSTEM_PROMPTS["xml"], callback: Callable | None = None,
                 tiled_decode: bool = False) -> GenerationResult:
        """Text-encode → sample → decode one request; returns images, latents and this run's ledger."""
        settings = replace(settings) if settings is not None else GenerationSettings()
        validate_size(settings.width, settings.height)
        self.ledger = Ledger()
        cond, uncond = self.encode([prompt, negative], system_prompt)
        latents = self.sample(cond, uncond, settings, callback)
        images, notes = self.decode(latents, tiled=tiled_decode)
        return GenerationResult(images=images, latents=latents, ledger=self.ledger, notes=notes)
