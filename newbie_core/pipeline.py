"""The CLI / Python-API host: the three stages (`stages.py`) over `memory.StagedModel` weights.

    pipe = Pipeline(ModelPaths.from_dir("NewBie-image-Exp0.1"), precision={"dit": "bf16", "vae": "fp32"})
    result = pipe.generate("1girl, smile", settings=GenerationSettings(width=1024, height=1024, seed=1))
    result.images  # [B,3,H,W] float32 in [0,1], CPU;  result.ledger.table()

Every stage loads its model onto the device for its work and releases it afterwards (unless `keep_loaded`),
and records wall time and peak memory in the ledger. Prompt embeddings are cached, so a repeated prompt
never loads the text encoders again. ComfyUI's host (`nodes/_comfy.py`) runs the same stages.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, NoReturn

import torch

from . import stages
from .files import fingerprint_or_none, loaded_fingerprint
from .validate import parse_device
from .fp8 import enable_fp8_matmul, fp8_matmul_supported
from .img2img import init_latent
from .memory import EmbeddingCache, Ledger, StagedModel, default_device, empty_device_cache, is_out_of_memory
from .model_paths import ModelPaths
from .precision import Precision, parse_precision
from .recovery import STAGE_NAMES, low_vram_hint, out_of_memory_error, release_failure
from .sizes import validate_size
from .stages import GenerationSettings, check_conditioning, guided_velocity  # noqa: F401  (public re-exports)
from .text.encode import PromptEmbeddings
from .text.prompts import SYSTEM_PROMPTS

log = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    """What `Pipeline.generate` returns: images [B,3,H,W] in [0,1], the unscaled latents (ComfyUI's LATENT
    convention) and the ledger."""

    images: torch.Tensor
    latents: torch.Tensor
    ledger: Ledger
    notes: list[str] = field(default_factory=list)


def compile_dit(forward: Callable) -> Callable:
    """The one way a host compiles the DiT: fullgraph (no graph breaks), static shapes; `dit.prepare` hands the
    graph per-caption-length constants, so a new caption length recompiles once."""
    return torch.compile(forward, fullgraph=True, dynamic=False)


class Pipeline:
    """NewBie-image-Exp0.1 as three stages with per-stage precision: the CLI host of `stages.py`."""

    name = "cli"
    output_device = torch.device("cpu")

    def __init__(self, paths: ModelPaths, device: torch.device | str | None = None,
                 precision: dict[str, str] | None = None, keep_loaded: bool = False, attention: str = "auto",
                 cache: EmbeddingCache | None = None, lowvram: bool = False, vram_budget: int | None = None,
                 compile: bool = False, fp8_matmul: bool = True, loras=()):
        """`lowvram`: stream DiT/Gemma/Jina blocks from CPU memory and decode in tiles (peak < 2 GiB at 1024²);
        `vram_budget`: bytes of blocks low-VRAM mode may keep resident (None: stream all). `compile`:
        torch.compile the DiT forward (not with lowvram). `fp8_matmul`: under fp8 DiT precision, use fp8
        tensor-core matmuls where the GPU has them (else fp8 is storage only). `loras`: [(LoRA/LoKr file,
        strength), …] merged into the DiT's CPU copy when it is first loaded (reports: `lora_reports()`)."""
        self.paths = paths
        self.lowvram, self.vram_budget, self.compile, self.fp8_matmul = lowvram, vram_budget, compile, fp8_matmul
        self._compiled: tuple[object, Callable] | None = None  # (the DiT, its compiled forward): one slot
        self.device = parse_device(device) or default_device()  # 'cuda:7', 'garbage': InputError, not a KeyError later
        self.precision_names = {"dit": "bf16", "text": "bf16", "vae": "auto", **(precision or {})}
        self.keep_loaded = keep_loaded
        self.attention = attention
        self.cache = cache if cache is not None else EmbeddingCache()
        self.ledger = Ledger()
        self._models: dict[str, StagedModel] = {}
        self._wrappers: dict[str, object] = {}
        self.loras = list(loras)

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
            loaded = load_role(role, self.paths, attention=self.attention, loras=self.loras if role == "dit" else ())
            self._wrappers[role] = loaded.wrapper
            self._models[role] = StagedModel(role, loaded.module, loaded.source, loaded.cpu_only, loaded.stream)
            self._models[role].fingerprint = fingerprint_or_none(loaded.source)
        return self._models[role]

    def lora_reports(self) -> list:
        """One `LoraReport` per LoRA of `loras` (loads the DiT to the CPU if it is not yet)."""
        if not self.loras:
            return []
        self._load("dit")
        return list(getattr(self._wrappers["dit"], "lora_reports", []))

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

    # ------------------------------------------------------------ host interface (host.Host)
    def device_of(self, role: str) -> torch.device:
        """The device `role` computes on (every role: this pipeline's device)."""
        return self.device

    def peek(self, role: str):
        """The role's model as loaded (CPU copy), for checks before it is placed."""
        self._load(role)
        return self._wrappers[role]

    @contextmanager
    def placed(self, role: str, clear_cache: bool = True, memory_required: int = 0):
        """The role's wrapper with its weights on the device; released afterwards (also on failure) unless
        keep_loaded. `clear_cache=False` skips emptying the device cache (the next model reuses the blocks)."""
        try:
            yield self._acquire(role)
        finally:
            self._done_with(role, clear_cache)

    def dit_forward(self, dit) -> Callable:
        """The DiT's forward, compiled once per model when `compile` is on (not with block streaming)."""
        if not self.compile or self.lowvram:
            return dit
        if self._compiled is None or self._compiled[0] is not dit:
            self._compiled = (dit, compile_dit(dit))
        return self._compiled[1]

    def step_callback(self, intervals: int):
        """No progress display of its own: callers pass `callback` to `sample`/`generate`."""
        return None

    def check_interrupt(self) -> None:
        """Nothing to check: a callback raising `InterruptedByUser` (or Ctrl-C) cancels."""

    def measure(self, stage: str):
        """This run's ledger records the stage."""
        return self.ledger.stage(stage, self.device)

    def text_identity(self) -> tuple:
        """Encoder content fingerprints (taken when each was loaded, else of the file now), text precision and
        the Jina token limit: the embedding-cache identity."""
        return (*(loaded_fingerprint(self._models.get(r), getattr(self.paths, r, None)) for r in ("gemma", "jina")),
                self.precision_names["text"], getattr(self.paths, "jina_max_length", 512))

    def fail(self, stage: str, exc: BaseException) -> NoReturn:
        """Release everything a failed stage held (models, its frames' tensors, the device cache); turn OOM
        into an error that lists the lower-memory options; re-raise. The pipeline stays usable."""
        for m in self._models.values():
            m.release(clear_cache=False)
        release_failure(exc, self.device)
        if is_out_of_memory(exc):
            raise out_of_memory_error(STAGE_NAMES[stage], self.device, low_vram_hint(stage, "cli")) from exc
        raise exc

    # ---------------------------------------------------------------- stages
    def encode(self, prompts: list[str], system_prompt: str = SYSTEM_PROMPTS["xml"]) -> list[PromptEmbeddings]:
        """Encode prompts (each batch 1, on the CPU), through the embedding cache; the text stage."""
        n_records = len(self.ledger.records)
        embs, cached = stages.encode(self, self.cache, prompts, system_prompt)
        if len(self.ledger.records) > n_records:
            self.ledger.records[-1].notes.append(f"{len(prompts) - cached} encoded, {cached} from cache")
        return embs

    def sample(self, cond: PromptEmbeddings, uncond: PromptEmbeddings, settings: GenerationSettings,
               callback: Callable | None = None, latent: dict | None = None) -> torch.Tensor:
        """Run the sampler; returns unscaled latents [B,16,H/8,W/8] (fp32, CPU); the DiT stage. `latent`: a
        core LATENT dict to start from (img2img with `settings.denoise`, inpainting with its `noise_mask`)."""
        return stages.sample(self, cond, uncond, settings, callback, latent=latent)

    def encode_image(self, images: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        """Images [B,3,H,W] in [0,1] → unscaled latents (fp32, CPU) for img2img; a VAE stage in the ledger."""
        return stages.encode_image(self, images, tiled or self.lowvram)[0]

    def decode(self, latents: torch.Tensor, tiled: bool = False) -> tuple[torch.Tensor, list[str]]:
        """Decode unscaled latents to images [B,3,H,W] in [0,1] (fp32, CPU); the VAE stage. Returns notes too."""
        tiled = tiled or self.lowvram
        images, used_tiled = stages.decode(self, latents, tiled)
        notes = ["out of memory in full decode: decoded in tiles instead"] if used_tiled and not tiled else []
        return images, notes

    def generate(self, prompt: str, negative: str = "", settings: GenerationSettings | None = None,
                 system_prompt: str = SYSTEM_PROMPTS["xml"], callback: Callable | None = None,
                 tiled_decode: bool = False, init_image: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None) -> GenerationResult:
        """Text-encode → sample → decode one request; returns images, latents and this run's ledger.
        img2img: `init_image` [1|B,3,H,W] in [0,1] at the settings' size, with `settings.denoise`; inpainting:
        `mask` [H,W] (1 = regenerate, 0 = keep)."""
        settings = replace(settings) if settings is not None else GenerationSettings()
        validate_size(settings.width, settings.height)
        self.ledger = Ledger()
        cond, uncond = self.encode([prompt, negative], system_prompt)
        latent = None if init_image is None else init_latent(self.encode_image(init_image, tiled=tiled_decode), mask,
                                                              settings.batch, settings.height, settings.width)
        latents = self.sample(cond, uncond, settings, callback, latent=latent)
        images, notes = self.decode(latents, tiled=tiled_decode)
        return GenerationResult(images=images, latents=latents, ledger=self.ledger, notes=notes)
