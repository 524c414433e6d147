"""One test per version guard in nodes/_comfy.py (ComfyUI calls that changed after 0.3.64).

These run on every ComfyUI host of the test run (tests/hosts.py): the branch the running version takes is
exercised for real, the other branch by simulating what the newer/older ComfyUI does.
"""
from __future__ import annotations

import sys
import types

import pytest
import torch


@pytest.fixture()
def guards(pack):
    return pack.nodes._comfy


def test_host_version_is_reported(comfyui):
    """The host under test says which ComfyUI it is (the version the per-host tally names)."""
    import comfyui_version

    assert comfyui_version.__version__.count(".") >= 1
    assert str(comfyui.dir) in comfyui_version.__file__


def test_text_encoder_device_is_comfyuis_without_dynamic_vram(comfyui, guards):
    assert not guards.dynamic_vram()  # 0.3.64 and the 0.4.0 fork have no dynamic VRAM
    assert guards.text_encoder_load_device() == comfyui.mm.text_encoder_device()


@pytest.mark.parametrize("state", ["LOW_VRAM", "NO_VRAM", "NORMAL_VRAM"])
def test_text_encoder_stays_off_the_gpu_in_lowvram_under_dynamic_vram(comfyui, guards, monkeypatch, state):
    mm = comfyui.mm
    gpu = torch.device("cuda", 0)
    monkeypatch.setitem(sys.modules, "comfy.memory_management", types.SimpleNamespace(aimdo_enabled=True))
    monkeypatch.setattr(mm, "text_encoder_device", lambda: gpu)  # what dynamic-VRAM ComfyUI returns
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState[state])
    assert guards.dynamic_vram()
    expected = mm.text_encoder_offload_device() if state != "NORMAL_VRAM" else gpu
    assert guards.text_encoder_load_device() == expected


@pytest.mark.parametrize("state", ["LOW_VRAM", "NO_VRAM", "NORMAL_VRAM"])
def test_text_encoders_stream_on_the_gpu_in_lowvram_without_dynamic_vram(comfyui, guards, monkeypatch, state):
    """0.3.64/0.4.0 put text encoders on the CPU under --lowvram; ours stream on the GPU there (--novram and the
    other modes keep ComfyUI's choice)."""
    mm = comfyui.mm
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.setattr(mm, "get_torch_device", lambda: gpu)
    monkeypatch.setattr(mm, "text_encoder_device", lambda: cpu if state != "NORMAL_VRAM" else gpu)
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState[state])
    assert not guards.dynamic_vram()
    assert guards.text_encoder_load_device() == (cpu if state == "NO_VRAM" else gpu)
    monkeypatch.setattr(mm, "get_torch_device", lambda: cpu)  # a CPU-only ComfyUI: nothing to stream to
    assert guards.text_encoder_load_device() == (cpu if state != "NORMAL_VRAM" else gpu)


def test_text_encoder_patcher_uses_the_guarded_device(comfyui, guards, monkeypatch):
    monkeypatch.setattr(guards, "text_encoder_load_device", lambda: torch.device("meta"))
    patcher = guards.module_patcher(torch.nn.Linear(2, 2), "text", "guard test")
    assert patcher.load_device == torch.device("meta")


# ------------------------------------------------------------- get_free_memory (inexact under dynamic VRAM)
def test_free_memory_on_this_host(comfyui, guards):
    dev = comfyui.mm.get_torch_device()
    got = guards.free_memory(dev)
    assert got > 0
    assert abs(got - comfyui.mm.get_free_memory(dev)) < 2**30  # same source, read a moment apart


def test_free_memory_prefers_the_patchers_count(comfyui, guards):
    class NewerPatcher:  # newer ComfyUI: counts idle resident models as free
        def get_free_memory(self, device):
            return 12345

    class OlderPatcher:  # 0.3.64 / 0.4.0: no such method
        pass

    dev = comfyui.mm.get_torch_device()
    assert guards.free_memory(dev, NewerPatcher()) == 12345
    assert guards.free_memory(dev, OlderPatcher()) == pytest.approx(comfyui.mm.get_free_memory(dev), rel=0.05)


def test_pinned_memory_counts_in_comfyuis_budget_where_it_has_one(comfyui, pack, monkeypatch):
    """ComfyUI ≥ 0.4 caps page-locked memory (MAX_PINNED_MEMORY; 0 with --disable-pinned-memory): the pack's
    pinned copies are counted in it and refused beyond it; 0.3.64 has none, so the pack counts its own pins
    against the same rule (simulated both ways here)."""
    compat, mm = pack.nodes._comfy_compat, comfyui.mm
    monkeypatch.setattr(mm, "MAX_PINNED_MEMORY", 100, raising=False)
    monkeypatch.setattr(mm, "TOTAL_PINNED_MEMORY", 30, raising=False)  # ComfyUI's own pins
    assert compat.reserve_pinned(60) and mm.TOTAL_PINNED_MEMORY == 90
    assert not compat.reserve_pinned(20) and mm.TOTAL_PINNED_MEMORY == 90  # over the cap: stream unpinned
    compat.release_pinned(60)
    assert mm.TOTAL_PINNED_MEMORY == 30
    monkeypatch.setattr(mm, "MAX_PINNED_MEMORY", -1)  # --disable-pinned-memory
    assert not compat.reserve_pinned(1)
    monkeypatch.delattr(mm, "MAX_PINNED_MEMORY")  # 0.3.64: no budget of ComfyUI's, the pack's own (same rule)
    monkeypatch.setattr(compat, "_own_pinned_limit", lambda: 100)
    before = compat._OWN_PINNED.TOTAL_PINNED_MEMORY
    assert compat.reserve_pinned(70) and not compat.reserve_pinned(100 - before - 69)
    compat.release_pinned(70)
    assert compat._OWN_PINNED.TOTAL_PINNED_MEMORY == before and compat.reserve_pinned(100 - before)
    compat.release_pinned(100 - before)
