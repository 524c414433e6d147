"""Loader nodes: DiT (MODEL), text encoders (Gemma3 + Jina CLIP v2), VAE. Each picks its precision and device."""
from __future__ import annotations

from comfy_api.latest import io

from ..newbie_core.attention import flash_attn_available
from ..newbie_core.files import fingerprint_or_none
from ..newbie_core.loading import CPU_ONLY, file_dtype
from ..newbie_core.model_names import default_choice
from ..newbie_core.precision import cast_module, parse_precision
from ..newbie_core.text.gemma import load_gemma
from ..newbie_core.text.jina import load_jina
from ..newbie_core.validate import check_attention, check_choice, check_number, parse_device
from ..newbie_core.vae import load_vae
from . import _comfy
from .types import NEWBIE_TEXT_ENCODERS, NEWBIE_VAE, LoadedVAE, TextEncoders

DIT_PRECISIONS = ["bf16", "fp16", "fp32", "fp8_e4m3fn"]
DEVICE_TIP = "Where this model runs: 'default' lets ComfyUI choose; pick a GPU on multi-GPU machines, or cpu."
STREAMING = {  # the DiT loader's `streaming` choices → model_options["newbie_stream"] (_comfy_lowvram.should_stream)
    "auto": "on a CUDA GPU the engine's pinned block streaming runs the DiT when it does not fit, and whenever the "
            "sampler releases it after sampling (keep_loaded off)",
    "on": "always the engine's streaming (within stream_vram_gb or the free memory)",
    "off": "ComfyUI's own loading (partial loading when memory is short; the DiT then stays loaded)",
}


class NewBieDiTLoader(io.ComfyNode):
    """Load the NewBie-image DiT from models/diffusion_models as a ComfyUI MODEL."""

    @classmethod
    def define_schema(cls):
        attention = ["auto", "sdpa", "comfyui"] + (["flash"] if flash_attn_available() else [])
        return io.Schema(
            node_id="NewBieDiTLoader", display_name="NewBie DiT Loader", category="NewBie/loaders",
            description="Loads NewBie-Image-Exp0.1.safetensors (official, ComfyUI-prefixed or diffusers keys; the "
                        "architecture is read from the tensor shapes) as a MODEL managed by ComfyUI's memory manager.",
            inputs=[
                io.Combo.Input("dit_name", options=(dits := _comfy.model_choices("diffusion_models")),
                               default=default_choice(dits, "dit"),
                               tooltip="The DiT file in models/diffusion_models (e.g. NewBie-Image-Exp0.1.safetensors)."),
                io.Combo.Input("precision", options=DIT_PRECISIONS, default="bf16",
                               tooltip="Weight precision. bf16: reference quality. fp8_e4m3fn: half the memory, "
                                       "computed in bf16. fp16 can overflow in this model family; fp32 is slow."),
                io.Combo.Input("attention", options=attention, default="auto",
                               tooltip="auto: flash-attn when installed, else PyTorch SDPA. comfyui: ComfyUI's "
                                       "attention (follows --use-sage-attention etc.)."),
                io.Boolean.Input("compile", default=False,
                                 tooltip="torch.compile the DiT on first use (slow first run, faster steps)."),
                io.Combo.Input("device", options=_comfy.DEVICE_CHOICES, default="default", tooltip=DEVICE_TIP),
                io.Combo.Input("streaming", options=list(STREAMING), default="auto", optional=True,
                               tooltip="; ".join(f"{k}: {v}" for k, v in STREAMING.items()) + "."),
                io.Float.Input("stream_vram_gb", default=0.0, min=0.0, max=1024.0, step=0.25, optional=True,
                               tooltip="Cap the DiT's blocks on the GPU at this many GB (the rest are copied in "
                                       "per step, one ahead; on an H200 a 2 GB cap ran at 1.02× the full-load "
                                       "step). > 0 turns streaming on under auto; ignored with off and for "
                                       "LoRA-patched or compiled DiTs. 0 = as much as the free memory allows."),
            ],
            outputs=[io.Model.Output(tooltip="The NewBie DiT; connect to NewBie DiT Sampler.")],
        )

    @classmethod
    def fingerprint_inputs(cls, dit_name, **_):
        """Re-run when the file changes on disk (same name, new content)."""
        return _comfy.model_fingerprint("diffusion_models", dit_name)

    @classmethod
    def execute(cls, dit_name, precision, attention, compile, device, streaming="auto",
                stream_vram_gb=0.0) -> io.NodeOutput:
        parse_device(device), check_attention(attention, extra=("comfyui",))  # before any file is read
        streaming = check_choice(streaming, "streaming", STREAMING)
        budget = check_number(stream_vram_gb, "stream_vram_gb", 0.0, 1024.0)
        path = _comfy.resolve_model("diffusion_models", dit_name,
                                    "NewBie-Image-Exp0.1.safetensors (NewBie-AI/NewBie-image-Exp0.1)")
        prec = parse_precision(precision, "dit")
        patcher = _comfy.load_dit_patcher(path, prec, attention, device)
        patcher.model_options["newbie_compile"] = bool(compile)
        patcher.model_options["newbie_precision"] = precision
        # a VRAM cap asks for the engine's streaming (auto would load a DiT that fits whole)
        patcher.model_options["newbie_stream"] = "on" if budget > 0 and streaming == "auto" else streaming
        if budget > 0:
            patcher.model_options["newbie_stream_budget"] = int(budget * 2**30)
        return io.NodeOutput(patcher)


class NewBieTextEncoderLoader(io.ComfyNode):
    """Load Gemma3-4B-it (per-token features) and Jina CLIP v2 (pooled vector) from models/text_encoders."""

    @classmethod
    def define_schema(cls):
        choices = _comfy.model_choices("text_encoders", want_folders=True)
        return io.Schema(
            node_id="NewBieTextEncoderLoader", display_name="NewBie Text Encoder Loader", category="NewBie/loaders",
            description="Loads the two NewBie text encoders: ComfyUI single files or HF folders (a folder with "
                        "config.json inside models/text_encoders). No remote code, no downloads.",
            inputs=[
                io.Combo.Input("gemma_name", options=choices, default=default_choice(choices, "gemma"),
                               tooltip="gemma_3_4b_it_bf16.safetensors, or the text_encoder/ folder of the HF repo."),
                io.Combo.Input("jina_name", options=choices, default=default_choice(choices, "jina"),
                               tooltip="jina_clip_v2_bf16.safetensors, or the clip_model/ folder of the HF repo."),
                io.Combo.Input("precision", options=DIT_PRECISIONS, default="bf16",
                               tooltip="Gemma weight precision (fp8_e4m3fn halves its memory; Jina then uses bf16)."),
                io.Combo.Input("device", options=_comfy.DEVICE_CHOICES, default="default", tooltip=DEVICE_TIP),
                io.Int.Input("jina_max_length", default=512, min=8, max=8192, step=8, optional=True,
                             tooltip="Jina CLIP token limit: 512 = NewBie's HF pipeline (default), 2048 = the "
                                     "official demo. Longer prompts are cut there (Gemma is always cut at 512)."),
            ],
            outputs=[NEWBIE_TEXT_ENCODERS.Output(tooltip="Both encoders; connect to NewBie Text Encode.")],
        )

    @classmethod
    def fingerprint_inputs(cls, gemma_name, jina_name, **_):
        """Re-run when either encoder's files change on disk (same name, new content)."""
        return (_comfy.model_fingerprint("text_encoders", gemma_name), _comfy.model_fingerprint("text_encoders", jina_name))

    @classmethod
    def execute(cls, gemma_name, jina_name, precision, device, jina_max_length=512) -> io.NodeOutput:
        parse_device(device)  # before any file is read
        gpath = _comfy.resolve_model("text_encoders", gemma_name, "gemma_3_4b_it_bf16.safetensors")
        jpath = _comfy.resolve_model("text_encoders", jina_name, "jina_clip_v2_bf16.safetensors")
        gprec, jprec = parse_precision(precision, "gemma"), parse_precision(precision, "jina")
        fingerprints = (fingerprint_or_none(gpath), fingerprint_or_none(jpath))  # what is loaded: the cache key
        gemma = load_gemma(gpath, dtype=file_dtype(gpath), device="cpu")
        jina = load_jina(jpath, dtype=file_dtype(jpath), device="cpu", max_length=jina_max_length)
        # Gemma's embedding table stays on the CPU in its file dtype (as in the CLI host), the rest is cast
        gemma_patcher = _comfy.module_patcher(gemma.model, "text", f"Gemma3 ({gpath.name})", device,
                                              cpu_only=CPU_ONLY["gemma"])
        cast_module(gemma.model, gprec, work_device=gemma_patcher.load_device)  # as the CLI quantises
        cast_module(jina.model, jprec)
        enc = TextEncoders(
            gemma=gemma, jina=jina, precision=precision, files=(str(gpath), str(jpath)), fingerprints=fingerprints,
            gemma_patcher=gemma_patcher,
            jina_patcher=_comfy.module_patcher(jina.model, "text", f"Jina CLIP v2 ({jpath.name})", device),
        )
        return io.NodeOutput(enc)


class NewBieVAELoader(io.ComfyNode):
    """Load the FLUX.1-dev VAE (ae.safetensors or a diffusers vae/ folder) from models/vae."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NewBieVAELoader", display_name="NewBie VAE Loader", category="NewBie/loaders",
            description="Loads the 16-channel FLUX.1-dev VAE through diffusers' AutoencoderKL.",
            inputs=[
                io.Combo.Input("vae_name", options=(vaes := _comfy.model_choices("vae", want_folders=True)),
                               default=default_choice(vaes, "vae"),
                               tooltip="ae.safetensors from black-forest-labs/FLUX.1-dev, or a diffusers vae/ folder."),
                io.Combo.Input("precision", options=["auto", "bf16", "fp32"], default="auto",
                               tooltip="auto: bf16 on GPUs that support it, else fp32. fp32 avoids rare banding."),
                io.Combo.Input("device", options=_comfy.DEVICE_CHOICES, default="default", tooltip=DEVICE_TIP),
            ],
            outputs=[NEWBIE_VAE.Output(tooltip="The VAE; connect to NewBie VAE Decode.")],
        )

    @classmethod
    def fingerprint_inputs(cls, vae_name, **_):
        """Re-run when the VAE's files change on disk (same name, new content)."""
        return _comfy.model_fingerprint("vae", vae_name)

    @classmethod
    def execute(cls, vae_name, precision, device) -> io.NodeOutput:
        parse_device(device)  # before any file is read
        path = _comfy.resolve_model("vae", vae_name, "ae.safetensors (FLUX.1-dev VAE)")
        vae = load_vae(path, dtype=file_dtype(path), device="cpu")
        cast_module(vae.model, parse_precision(precision, "vae", _comfy.device_for(device, _comfy.vae_device())))
        patcher = _comfy.module_patcher(vae.model, "vae", f"VAE ({path.name})", device)
        return io.NodeOutput(LoadedVAE(vae=vae, patcher=patcher, precision=precision))

