"""Core samplers on the pack's MODEL: positive and negative prompts of different caption lengths run in ONE DiT call
per step (nodes/_comfy_dit.CONDCaption pads the shorter caption; its mask marks the pads), and give what one call
per prompt gives."""
from __future__ import annotations

import pytest
import torch

from test_sampler import conditioning


def _sample(comfy_sample, model, positive, negative, steps=3):
    latent = torch.zeros(1, 16, 4, 4)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(3))
    return comfy_sample.sample(model, noise, steps, 4.0, "euler", "simple", positive, negative, latent,
                               disable_pbar=True, seed=3)


def _count_dit_calls(dm, monkeypatch) -> list[tuple[int, int]]:
    """(batch, caption length) of every DiT call."""
    calls, forward = [], dm.forward

    def counted(x, timesteps, context=None, **kwargs):
        calls.append((x.shape[0], context.shape[1]))
        return forward(x, timesteps, context=context, **kwargs)

    monkeypatch.setattr(dm, "forward", counted)
    return calls


def test_core_sampler_batches_captions_of_different_lengths_into_one_call(comfyui, pack, dit, monkeypatch):
    import comfy.sample

    dm = dit.model.diffusion_model
    positive, negative = conditioning(dm, 6, seed=1, padded_len=8), conditioning(dm, 2, seed=2, padded_len=3)
    calls = _count_dit_calls(dm, monkeypatch)
    batched = _sample(comfy.sample, dit, positive, negative)
    assert calls == [(2, 8)] * 3  # one call per step, the negative's caption padded to the positive's length

    calls.clear()  # the same run with concatenation refused: one call per prompt, as before
    monkeypatch.setattr(pack.nodes._comfy_dit.CONDCaption, "can_concat", comfy.conds.CONDRegular.can_concat)
    apart = _sample(comfy.sample, dit, positive, negative)
    assert sorted(calls) == sorted([(1, 8), (1, 3)] * 3)
    torch.testing.assert_close(batched, apart, rtol=1e-5, atol=1e-5)


def test_captions_without_a_mask_do_not_batch(comfyui, pack, dit, monkeypatch):
    """No mask means every token is real: zero padding would add tokens, so such captions keep one call each."""
    import comfy.sample

    dm = dit.model.diffusion_model
    positive, negative = conditioning(dm, 8, seed=1, padded_len=8), conditioning(dm, 3, seed=2, padded_len=3)
    for cond in (positive, negative):
        cond[0][1].pop("attention_mask")
    calls = _count_dit_calls(dm, monkeypatch)
    _sample(comfy.sample, dit, positive, negative, steps=2)
    assert sorted(calls) == sorted([(1, 8), (1, 3)] * 2)


@pytest.mark.parametrize("shape", [(1, 5, 7), (1, 5)])
def test_caption_cond_pads_on_the_right_with_zeros(comfyui, pack, shape):
    cond_cls = pack.nodes._comfy_dit.CONDCaption
    a, b = torch.ones(shape), torch.full((1, 2, *shape[2:]), 2.0)
    assert cond_cls(a).can_concat(cond_cls(b)) and not cond_cls(a).can_concat(cond_cls(torch.ones(2, *shape[1:])))
    out = cond_cls(b).concat([cond_cls(a)])
    assert out.shape == (2, 5, *shape[2:])
    assert bool((out[0, :2] == 2).all() and (out[0, 2:] == 0).all() and (out[1] == 1).all())
