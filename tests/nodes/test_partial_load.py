"""Every pack model partially loadable inside ComfyUI: with a budget smaller than the model, ComfyUI's
ModelPatcher leaves part of each model (Gemma, Jina, DiT, VAE) on the offload device and casts it per call, and
the engine's block streaming runs the DiT, giving the fully loaded image bit for bit (fp32: same arithmetic).
Also: ComfyUI sees true sizes; unloading/eviction/purge leave models that still run."""
from __future__ import annotations

import pytest
import torch

from test_one_engine import NEGATIVE, PROMPT, SETTINGS


@pytest.fixture
def budget(pack, comfyui, monkeypatch):
    """Replace the host's ComfyUI load by ComfyUI's own partial load (`LoadedModel.model_load` with a
    lowvram_model_memory of `state["fraction"]` × the model's size, what load_models_gpu does when VRAM is
    short); records (patcher, loaded bytes, model bytes) per load."""
    c, mm = pack.nodes._comfy, comfyui.mm
    state = {"fraction": None, "loads": []}
    original = c.load_to_device

    def load(patchers, memory_required=0, full=False):
        if state["fraction"] is None:
            return original(patchers, memory_required, full)
        for p in patchers:
            c.unload(p, clear_cache=False)
            lm = mm.LoadedModel(p)
            lm.model_load(lowvram_model_memory=max(1, int(p.model_size() * state["fraction"])))
            mm.current_loaded_models.insert(0, lm)
            state["loads"].append((p.newbie_label, p.loaded_size(), p.model_size()))

    monkeypatch.setattr(c, "load_to_device", load)
    return state


def run_graph(pack, loaders, enc=None, model=None, vae=None, precision="fp32"):
    te = pack.nodes.text_encode
    te.EMBEDDING_CACHE.clear()
    enc = enc or loaders.text_encoders(precision=precision)
    pos, neg = te.NewBieTextEncode.execute(text_encoders=enc, positive=PROMPT, negative=NEGATIVE,
                                           system_prompt="auto", keep_loaded=False).args
    model = model or loaders.dit(precision=precision, attention="sdpa")
    latent = pack.nodes.sampler.NewBieDiTSampler.execute(model=model, positive=pos, negative=neg, steps=3,
                                                         solver="euler", **SETTINGS).args[0]
    image = pack.nodes.vae_decode.NewBieVAEDecode.execute(vae=vae or loaders.vae(precision="fp32"), samples=latent,
                                                          precision="auto", tiled=False).args[0]
    text = torch.cat([pos[0][0].flatten(), pos[0][1]["pooled_output"].flatten()])  # Gemma features + Jina vector
    return text, latent["samples"], image


def test_every_pack_model_is_castable_and_sized_truly(pack, loaders):
    low, c = pack.nodes._comfy_lowvram, pack.nodes._comfy
    enc, vae = loaders.text_encoders(precision="fp32"), loaders.vae(precision="fp32")
    for patcher in (enc.gemma_patcher, enc.jina_patcher, vae.patcher):
        c.make_partially_loadable(patcher)
        assert low.all_castable(patcher.model), patcher.newbie_label
        true = sum(t.numel() * t.element_size() for t in list(patcher.model.parameters()) + list(patcher.model.buffers()))
        # what ComfyUI budgets is what moves: no embedding table, non-persistent buffers (rotary caches) counted
        assert patcher.model_size() == true, patcher.newbie_label
    table = enc.gemma.model.embed_tokens.weight
    assert all(p is not table for p in enc.gemma_patcher.model.parameters())  # Gemma's table: CPU, outside
    assert low.all_castable(loaders.dit(precision="fp32").model.diffusion_model)


@pytest.mark.parametrize("precision", ["fp32", "fp8_e4m3fn"])
def test_partial_loading_gives_the_full_load_output_bit_for_bit(pack, loaders, budget, precision):
    full = run_graph(pack, loaders, precision=precision)
    budget["fraction"] = 0.3
    part = run_graph(pack, loaders, precision=precision)
    labels = {label for label, loaded, size in budget["loads"] if loaded < size}
    assert any("Gemma" in x for x in labels) and any("Jina" in x for x in labels)
    assert any("DiT" in x for x in labels) and any("VAE" in x for x in labels)
    for a, b, what in zip(full, part, ("text features", "latents", "image")):
        assert torch.equal(a, b), f"{what} differ under partial loading"


def test_partial_loading_is_really_partial(pack, loaders, budget):
    """The comparison above can fail: a budget of 0.3 leaves weights off the load device (cast per call)."""
    budget["fraction"] = 0.3
    enc = loaders.text_encoders(precision="fp32")
    run_graph(pack, loaders, enc=enc)
    assert all(loaded < size for _, loaded, size in budget["loads"])


def test_block_streaming_of_the_dit_gives_the_full_load_latents(pack, loaders, monkeypatch):
    """The loader's streaming options: a 1-byte VRAM cap streams every block, a large one keeps all resident;
    both give the full-load latents, and the host weights are back in place after each run."""
    enc = loaders.text_encoders(precision="fp32")
    _, ref, _ = run_graph(pack, loaders, enc=enc, model=loaders.dit(precision="fp32", attention="sdpa"))
    seen = []

    class Spy(pack.nodes._comfy_lowvram.LayerStreamer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            seen.append((self.resident, len(self.layers)))

    monkeypatch.setattr(pack.nodes._comfy_lowvram, "LayerStreamer", Spy)
    outs = []
    for gb in (2**-30, 1000.0):  # 1 byte: nothing resident; 1000 GB: everything
        model = loaders.dit(precision="fp32", attention="sdpa", streaming="auto", stream_vram_gb=gb)
        assert model.model_options["newbie_stream"] == "on"  # a cap asks for streaming under auto
        dm = model.model.diffusion_model
        before = {n: p.data_ptr() for n, p in dm.named_parameters()}
        outs.append(run_graph(pack, loaders, enc=enc, model=model)[1])
        assert {n: p.data_ptr() for n, p in dm.named_parameters()} == before  # host weights back in place
    assert seen[0][0] == 0 and seen[1][0] == seen[1][1] > 0
    assert torch.equal(outs[0], ref) and torch.equal(outs[1], ref)


def test_dit_layers_take_a_pre_quantised_fp8_input_resident_or_cast_per_call_but_never_patched(pack, loaders):
    """The fused fp8 SwiGLU gate (newbie_core/fp8_gate.py) hands `w2` an already quantised input: resident, or while
    ComfyUI casts that layer's weight per call (partial load: the same scaled matmul, the weight brought for the
    call), so partial and full loads compute alike; never while a patch (LoRA under low VRAM) applies per call."""
    from newbie_core.fp8 import _quantize_rows

    dm = loaders.dit(precision="fp8_e4m3fn", attention="sdpa").model.diffusion_model
    w2 = next(m for m in dm.modules() if type(m).__name__ == "FeedForward").w2  # the pack's copy of the class
    assert isinstance(w2, pack.nodes._comfy_dit.NewBieOps.Linear) and w2.weight.dtype == torch.float8_e4m3fn
    w2.fp8_matmul = True
    x = torch.randn(32, w2.in_features, dtype=torch.bfloat16)
    x8, scale = _quantize_rows(x)
    assert w2.fp8_input_ready(x)
    resident = w2.forward_fp8_input(x8, scale, torch.bfloat16)
    w2.comfy_cast_weights = True
    assert w2.fp8_input_ready(x)
    assert torch.equal(w2.forward_fp8_input(x8, scale, torch.bfloat16), resident)
    w2.to("meta")  # a weight elsewhere: brought per call, no device check (the cast path moves it)
    assert w2.fp8_input_ready(x)
    w2.comfy_cast_weights, w2.weight_function = False, [lambda w: w]
    assert not w2.fp8_input_ready(x)
    w2.weight_function = []
    assert not w2.fp8_input_ready(x)  # resident again but on another device


def test_dit_loader_streaming_inputs_are_checked(pack, loaders):
    InputError = pack.newbie_core.errors.InputError
    with pytest.raises(InputError, match="streaming"):
        loaders.dit(precision="fp32", streaming="sometimes")
    with pytest.raises(InputError, match="stream_vram_gb"):
        loaders.dit(precision="fp32", stream_vram_gb=float("nan"))
    off = loaders.dit(precision="fp32", streaming="off", stream_vram_gb=2.0)
    assert pack.nodes._comfy_lowvram.should_stream(off, 0, released_after=True) is False


def test_streaming_is_automatic_only_on_cuda_and_the_loader_option_overrides(pack, loaders):
    low = pack.nodes._comfy_lowvram
    model = loaders.dit(precision="fp32", attention="sdpa")
    assert low.should_stream(model, 0) is False  # CPU device: ComfyUI's own path
    model.model_options["newbie_stream"] = "on"
    assert low.should_stream(model, 0) is True
    model.model_options["newbie_compile"] = True  # compiled graphs keep the resident path
    assert low.should_stream(model, 0) is False


def test_text_encoders_released_after_their_stage_take_the_pinned_path_on_cuda(pack):
    """A model unloaded right after its stage (text encoders, keep_loaded off) uploads from the pinned copy and
    releases by re-pointing on any CUDA ComfyUI; kept models and CPU devices stay on ComfyUI's path; the
    loader's override wins both ways."""
    from types import SimpleNamespace

    low = pack.nodes._comfy_lowvram

    def patcher(device, **options):
        return SimpleNamespace(load_device=torch.device(device), model_options=options, patches={})

    assert low.should_stream(patcher("cuda:0"), 0, released_after=True) is True
    assert low.should_stream(patcher("cpu"), 0, released_after=True) is False
    assert low.should_stream(patcher("cuda:0", newbie_stream="off"), 0, released_after=True) is False
    on_gpu = patcher("cuda:0", newbie_stream="on")
    on_gpu.offload_device = torch.device("cuda:0")  # --highvram DiT / --gpu-only: no host copy to stream from
    assert low.should_stream(on_gpu, 10**15, released_after=True) is False
    lora = patcher("cuda:0")
    lora.patches = {"w": [1]}  # ComfyUI applies patches itself
    assert low.should_stream(lora, 0, released_after=True) is False
    real = low.dynamic_vram
    low.dynamic_vram = lambda: True  # newest ComfyUI plans every allocation itself
    try:
        assert low.should_stream(patcher("cuda:0"), 0, released_after=True) is False
        assert low.should_stream(patcher("cuda:0", newbie_stream="on"), 0) is True
    finally:
        low.dynamic_vram = real


def test_a_model_evicted_by_another_load_still_runs_and_purge_releases_everything(pack, loaders, comfyui, budget):
    mm, c = comfyui.mm, pack.nodes._comfy
    enc, model, vae = loaders.text_encoders(precision="fp32"), loaders.dit(precision="fp32"), loaders.vae("fp32")
    ref = run_graph(pack, loaders, enc=enc, model=model, vae=vae)
    budget["fraction"] = 0.5
    c.load_to_device([model])
    c.load_to_device([vae.patcher])
    mm.free_memory(10**15, model.load_device, keep_loaded=[])  # another model's load evicts everything
    assert not mm.current_loaded_models
    again = run_graph(pack, loaders, enc=enc, model=model, vae=vae)
    for a, b in zip(ref, again):
        assert torch.equal(a, b)
    c.load_to_device([model])
    assert any(m.model is model for m in mm.current_loaded_models)

    class Pinned:  # what streamed_dit leaves on a CUDA machine: a registered PinnedArena
        closed = False

        def close(self):
            Pinned.closed = True

    pinned = model.newbie_arena = Pinned()
    pack.nodes.memory_purge.NewBieMemoryPurge.execute()  # Memory Purge ("/free" unloads the same way)
    assert not mm.current_loaded_models
    assert not any(r["loaded_by_comfyui"] for r in c.pack_models())
    for p in (model, vae.patcher, enc.gemma_patcher, enc.jina_patcher):
        assert getattr(p, "newbie_arena", None) is None
        assert all(not getattr(m, "comfy_cast_weights", False) for m in p.model.modules())  # no lowvram state left
        assert {t.device for t in p.model.parameters()} == {p.offload_device}
    assert pinned.closed  # the page-locked DiT copy was unregistered


def test_block_streaming_of_the_text_encoders_gives_the_same_features(pack, loaders):
    enc = loaders.text_encoders(precision="fp32")
    ref, _, _ = run_graph(pack, loaders, enc=enc)
    counts = []
    orig = pack.nodes._comfy_lowvram.LayerStreamer

    class Spy(orig):
        def __init__(self, layers, *a, **k):
            super().__init__(layers, *a, **k)
            counts.append(len(self.layers))

    for p in (enc.gemma_patcher, enc.jina_patcher):
        p.model_options.update(newbie_stream="on", newbie_stream_budget=0)
    pack.nodes._comfy_lowvram.LayerStreamer = Spy
    try:
        out, _, _ = run_graph(pack, loaders, enc=enc)
    finally:
        pack.nodes._comfy_lowvram.LayerStreamer = orig
        for p in (enc.gemma_patcher, enc.jina_patcher):
            p.model_options.pop("newbie_stream"), p.model_options.pop("newbie_stream_budget")
    assert len(counts) >= 2 and all(n > 0 for n in counts)  # Gemma and Jina each streamed their layers
    assert torch.equal(out, ref)


@pytest.mark.parametrize("keep_loaded", [False, True])
def test_the_sampler_releases_the_dit_after_sampling_unless_keep_loaded(pack, loaders, monkeypatch, keep_loaded):
    """keep_loaded off (default): the DiT's placement asks for the released-after path (on CUDA: pinned upload,
    released when sampling ends, so VAE decoding never runs beside it); on: ComfyUI keeps it loaded."""
    low = pack.nodes._comfy_lowvram
    asked, real = [], low.should_stream

    def spy(patcher, memory_required, released_after=False):
        asked.append((patcher.newbie_label, released_after))
        return real(patcher, memory_required, released_after)

    monkeypatch.setattr(low, "should_stream", spy)
    enc, model = loaders.text_encoders(precision="fp32"), loaders.dit(precision="fp32", attention="sdpa")
    pos, neg = pack.nodes.text_encode.NewBieTextEncode.execute(
        text_encoders=enc, positive=PROMPT + " keep", negative=NEGATIVE, system_prompt="auto", keep_loaded=False).args
    asked.clear()
    pack.nodes.sampler.NewBieDiTSampler.execute(model=model, positive=pos, negative=neg, steps=2, solver="euler",
                                                keep_loaded=keep_loaded, **SETTINGS)
    assert asked and set(asked) == {(model.newbie_label, not keep_loaded)}


def test_highvram_keeps_every_model_loaded_whatever_the_nodes_option(pack, comfyui, monkeypatch):
    mm = comfyui.mm
    assert pack.nodes._comfy.ComfyHost(keep_loaded=False).keep_loaded is False
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.HIGH_VRAM)  # --highvram / --gpu-only
    assert pack.nodes._comfy.ComfyHost(keep_loaded=False).keep_loaded is True


def test_pinning_the_dit_blocks_takes_every_tensor_over_in_place(pack, loaders, monkeypatch):
    """`_pin_blocks` (CUDA hosts; registration simulated): every block tensor then aliases one arena with its
    values unchanged; a weight ComfyUI moved away and back (a fresh pageable copy) is copied into its place in
    the same arena at the next stage."""
    low = pack.nodes._comfy_lowvram
    model = loaders.dit(precision="fp32", attention="sdpa")
    dm = model.model.diffusion_model
    blocks = low._blocks(dm, "dit")
    before = {k: v.clone() for k, v in dm.state_dict().items()}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = low.PinnedArena
    monkeypatch.setattr(low, "PinnedArena", lambda *a, **k: real(*a, **{**k, "pin": False}))  # no CUDA here

    def in_arena(t):
        buf = model.newbie_arena.buffer
        return buf.data_ptr() <= t.data_ptr() < buf.data_ptr() + buf.numel()

    low._pin_blocks(model, blocks)
    arena = model.newbie_arena
    assert all(in_arena(t) for b in blocks for *_, t in low._tensors(b))
    assert all(torch.equal(v, before[k]) for k, v in dm.state_dict().items())
    w = next(blocks[0].parameters())
    moved = w.data.clone() + 1
    w.data = moved.clone()  # what ComfyUI's partial load + unload leaves: a fresh pageable copy
    low._pin_blocks(model, blocks)
    assert model.newbie_arena is arena and in_arena(w) and torch.equal(w.data, moved)
