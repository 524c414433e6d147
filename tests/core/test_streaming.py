"""Low-VRAM block streaming: identical results at every budget, bounded device buffers, clean detach."""
import pytest
import torch
from torch import nn

from newbie_core.dit import DiTConfig, NextDiT
from newbie_core.memory import StagedModel
from newbie_core.model_paths import ModelPaths
from newbie_core.pipeline import GenerationSettings, Pipeline
from newbie_core.precision import parse_precision
from newbie_core.streaming import LayerStreamer, block_nbytes, resident_for_budget


def _blocks(n=5, width=16, seed=0):
    torch.manual_seed(seed)
    return nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width)) for _ in range(n))


def _run(blocks, x, order=None):
    for i in order or range(len(blocks)):
        x = blocks[i](x)
    return x


@pytest.mark.parametrize("resident,prefetch", [(0, 1), (2, 1), (0, 2), (5, 1), (4, 3)])
def test_streamed_blocks_compute_exactly_what_resident_blocks_do(resident, prefetch):
    blocks = _blocks()
    x = torch.randn(3, 16)
    ref = _run(blocks, x)
    hosts = [b[0].weight.data for b in blocks]
    s = LayerStreamer(list(blocks), "cpu", resident=resident, prefetch=prefetch)
    for _ in range(3):  # repeated calls reuse the slots (wrap-around prefetch)
        assert torch.equal(_run(blocks, x), ref)
    assert s.device_bytes <= (resident + min(prefetch + 1, 5 - resident)) * block_nbytes(blocks[0])
    s.detach()
    assert all(b[0].weight.data.data_ptr() == h.data_ptr() for b, h in zip(blocks, hosts)), "detach restores host tensors"
    assert torch.equal(_run(blocks, x), ref)


def test_blocks_called_out_of_order_still_get_their_own_weights():
    blocks = _blocks()
    x = torch.randn(2, 16)
    order = [3, 0, 4, 1, 2, 2, 0]
    ref = _run(blocks, x, order)
    s = LayerStreamer(list(blocks), "cpu", prefetch=1)
    assert torch.equal(_run(blocks, x, order), ref)
    s.detach()


def test_between_calls_every_streamed_block_points_at_host_memory():
    blocks = _blocks()
    s = LayerStreamer(list(blocks), "cpu", resident=1)
    _run(blocks, torch.randn(1, 16))
    slot_ptrs = {t.data_ptr() for t in s.slots}
    for b in blocks[1:]:
        ptr = b[0].weight.data.untyped_storage().data_ptr()
        assert ptr not in slot_ptrs
    s.detach()


def test_resident_count_follows_the_budget():
    sizes = [100] * 10
    assert resident_for_budget(sizes, None) == 0
    assert resident_for_budget(sizes, 150) == 0, "the two streaming slots are paid first"
    assert resident_for_budget(sizes, 200) == 0 and resident_for_budget(sizes, 300) == 1
    assert resident_for_budget(sizes, 10**9) == 10
    counts = [resident_for_budget(sizes, b) for b in range(0, 1400, 37)]
    assert counts == sorted(counts), "more budget never means fewer resident blocks"


def _tiny_dit(seed=0):
    cfg = DiTConfig(dim=64, n_heads=4, n_kv_heads=2, n_layers=4, n_refiner_layers=2, cap_feat_dim=32,
                    clip_text_dim=24, axes_dims=(4, 6, 6), axes_lens=(300, 64, 64))
    torch.manual_seed(seed)
    dit = NextDiT(cfg)
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, 0.1)
    return dit.eval()


def _dit_inputs(dit, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 8, 8, generator=g)
    feats = torch.randn(2, 12, 32, generator=g)
    mask = torch.tensor([[1] * 12, [1] * 5 + [0] * 7])
    pooled = torch.randn(2, 24, generator=g)
    return x, torch.tensor([0.3, 0.3]), feats, mask, pooled


def _resident_then_streamed(precision: str, budget=None):
    """A tiny DiT's output fully resident, then the same DiT re-acquired with streamed blocks."""
    dit = _tiny_dit()
    inputs = _dit_inputs(dit)
    staged = StagedModel("dit", dit, stream=("context_refiner", "noise_refiner", "layers"))
    prec = parse_precision(precision, "dit")
    staged.acquire("cpu", prec)
    ref = dit(*inputs)
    staged.acquire("cpu", prec, streaming=True, budget=budget)
    return dit, staged, inputs, ref


@pytest.mark.parametrize("budget", [None, 0, 10**5, 3 * 10**5, 10**9])
def test_staged_dit_streams_at_every_budget_with_identical_output(budget):
    dit, staged, inputs, ref = _resident_then_streamed("fp32", budget)
    assert staged.streamer is not None and len(staged.streamer.layers) == 8
    assert torch.equal(dit(*inputs), ref)
    assert staged.describe()["streaming"]["blocks"] == 8
    staged.release()
    assert staged.streamer is None and not dit.layers[0]._forward_pre_hooks, "hooks removed on release"


def test_streaming_with_fp8_storage_matches_resident_fp8():
    dit, staged, inputs, ref = _resident_then_streamed("fp8_e4m3fn")
    assert dit.layers[0].attention.qkv.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(dit(*inputs), ref)
    staged.release()


def test_lowvram_pipeline_gives_the_same_image_and_releases_everything(tiny_models):
    paths = ModelPaths.from_dir(tiny_models["root"])
    prec = {"dit": "fp32", "text": "fp32", "vae": "fp32"}
    settings = GenerationSettings(width=64, height=48, steps=3, solver="euler", cfg=3.0, cfg_trunc=1.0, seed=5)
    ref = Pipeline(paths, device="cpu", precision=prec).generate("1girl", settings=settings)
    low = Pipeline(paths, device="cpu", precision=prec, lowvram=True)
    res = low.generate("1girl", settings=settings)
    assert torch.equal(res.latents, ref.latents)
    assert (res.images - ref.images).abs().max() < 1e-3, "tiled decode differs from the full decode only at seams"
    assert "tiled" in res.ledger.records[-1].notes
    assert all(m.streamer is None for m in low._models.values()), "streamers are detached after each stage"


def test_pinned_arena_absorbs_tensors_a_host_moved_and_refuses_another_layout():
    """After a host moved some weights away and back (fresh copies), absorb copies exactly those into their
    arena places: every tensor then aliases the arena and holds the moved copy's values."""
    from newbie_core.streaming import PinnedArena

    tensors = [torch.randn(4, 3), torch.randn(5), torch.randn(2, 2).to(torch.bfloat16)]
    arena = PinnedArena(tensors)
    current = list(arena.views)
    moved = torch.randn(5)  # e.g. ComfyUI loaded it to the device and unloaded it into new pageable memory
    current[1] = moved.clone()
    untouched = arena.views[0].clone()
    views = arena.absorb(current)
    assert views is arena.views
    assert [v.data_ptr() for v in views] == [v.data_ptr() for v in arena.views]
    assert torch.equal(views[1], moved) and torch.equal(views[0], untouched)
    assert arena.absorb(current[:2]) is None  # fewer tensors
    assert arena.absorb([current[0], torch.randn(6), current[2]]) is None  # another shape
    assert arena.absorb([current[0], current[1], current[2].float()]) is None  # another dtype


def test_unpinned_arena_still_serves_copies_and_never_reports_a_release():
    """pin=False (the host's pinned budget is spent): plain memory with the same views; `on_close` is only for
    registered buffers, so closing it gives nothing back."""
    from newbie_core.streaming import PinnedArena

    closed = []
    t = torch.randn(8)
    arena = PinnedArena([t], pin=False, on_close=lambda: closed.append(1))
    assert not arena.registered and torch.equal(arena.views[0], t)
    arena.close()
    assert closed == []


def _rss_mib() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="needs Linux /proc for RSS")
def test_arena_adopting_each_tensor_never_holds_the_model_twice():
    """With `adopt` the arena frees each original as soon as it is copied: host memory grows by about one
    tensor while pinning, where copying everything first held the whole model twice (both measured)."""
    from newbie_core.streaming import PinnedArena

    def build():  # 6 × 48 MiB: above glibc's largest mmap threshold, so a freed tensor goes back to the OS
        return {f"w{i}": torch.full((4096, 3072), float(i), dtype=torch.float32) for i in range(6)}

    total = 6 * 48
    growth = {}
    for mode in ("all first", "adopt"):
        owner = build()
        names, base, peak = list(owner), _rss_mib(), [0.0]

        def adopt(i, view):
            owner[names[i]] = view
            peak[0] = max(peak[0], _rss_mib() - base)

        arena = PinnedArena([owner[k] for k in names], pin=False, adopt=adopt if mode == "adopt" else None)
        peak[0] = max(peak[0], _rss_mib() - base)
        if mode == "all first":
            owner.update(zip(names, arena.views))
        assert all(torch.equal(owner[k], torch.full((4096, 3072), float(i))) for i, k in enumerate(names))
        assert all(owner[k].data_ptr() == v.data_ptr() for k, v in zip(names, arena.views))
        growth[mode] = peak[0]
    assert growth["all first"] > 0.8 * total, growth  # the measurement sees the old transient copy
    assert growth["adopt"] < 0.4 * total, growth


def test_staged_model_pin_moves_every_weight_into_the_arena_in_place(monkeypatch):
    """`StagedModel.pin` (CUDA hosts; registration simulated here) leaves the module and its pristine copy
    aliasing the arena, values unchanged, and the model computing the same."""
    import functools

    import newbie_core.memory as memory
    from newbie_core.streaming import PinnedArena

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4))
    x = torch.randn(2, 8)
    ref, before = m(x), {k: v.clone() for k, v in m.state_dict().items()}
    staged = StagedModel("toy", m)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(memory, "PinnedArena", functools.partial(PinnedArena, pin=False))
    staged.pin()
    lo = staged._arena.buffer.data_ptr()
    hi = lo + staged._arena.buffer.numel()
    for k, v in m.state_dict().items():
        assert lo <= v.data_ptr() < hi and torch.equal(v, before[k]), k
        assert staged._pristine[k].data_ptr() == v.data_ptr(), k
    assert torch.equal(m(x), ref)
