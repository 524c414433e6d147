"""Generation with the loaded Gemma (text/lm.py): equal to transformers' own Gemma3ForCausalLM.generate, seeded
sampling, max_new_tokens, per-token hook and cancel within one token, the head copy freed afterwards."""
from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

from newbie_core.errors import InterruptedByUser
from newbie_core.text.gemma import load_gemma
from newbie_core.text.lm import SamplingSettings, causal_lm_view, generate_ids, generation_head

GREEDY = SamplingSettings(max_new_tokens=10, temperature=0)


@pytest.fixture(scope="module")
def gemma(tiny_models):
    return load_gemma(tiny_models["gemma_comfyui"], dtype=torch.float32)


@pytest.fixture(scope="module")
def gemma_f64_table(gemma):
    """The same model with its embedding table stored in float64 (another dtype than the layers): the
    generation then needs a compute-dtype copy of the head, as the CLI's CPU-kept table does."""
    enc = copy.deepcopy(gemma)
    enc.model.embed_tokens.weight.data = enc.model.embed_tokens.weight.data.double()
    return enc


@pytest.fixture(scope="module")
def reference(gemma):
    """transformers' Gemma3ForCausalLM with the same weights and the tied head."""
    from transformers import Gemma3ForCausalLM

    ref = Gemma3ForCausalLM(gemma.model.config).eval()
    ref.model.load_state_dict(gemma.model.state_dict())
    ref.lm_head.weight = ref.model.embed_tokens.weight
    return ref


def prompt_ids(n: int = 24, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [2] + torch.randint(4, 400, (n,), generator=g).tolist()


def reference_greedy(ref, ids: list[int], n: int, stop: int) -> list[int]:
    x = torch.tensor([ids])
    out = ref.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n, eos_token_id=stop,
                       pad_token_id=0)[0, len(ids):].tolist()
    return out[: out.index(stop)] if stop in out else out


@pytest.mark.parametrize("which", ["shared table", "head copy"])
def test_greedy_equals_transformers_generate(gemma, gemma_f64_table, reference, which):
    enc = gemma if which == "shared table" else gemma_f64_table
    for seed in (0, 1, 2):
        ids = prompt_ids(seed=seed)
        expected = reference_greedy(reference, ids, GREEDY.max_new_tokens, stop=1)
        with generation_head(enc.model) as view:
            got = generate_ids(view, ids, GREEDY, stop_ids=[1]).ids
        assert got == expected


def test_the_view_shares_the_encoder_weights_and_the_head_copy_is_dropped(gemma, gemma_f64_table):
    view = causal_lm_view(gemma.model)
    assert view.model.layers is gemma.model.layers and view.model.norm is gemma.model.norm
    assert causal_lm_view(gemma.model) is view, "built once per model"
    assert not any(p.is_meta for p in view.parameters())
    with generation_head(gemma.model) as v:
        assert v.lm_head.table.data_ptr() == gemma.model.embed_tokens.weight.data_ptr(), "no copy when it fits"
    with generation_head(gemma_f64_table.model) as v:
        table = v.lm_head.table
        assert table.dtype == torch.float32 and table.data_ptr() != gemma_f64_table.model.embed_tokens.weight.data_ptr()
        ref = weakref.ref(table)
        del table
    gc.collect()
    assert ref() is None, "the generation-only head copy outlived the generation"


def test_head_on_cpu_gives_the_same_tokens(gemma_f64_table, gemma):
    ids = prompt_ids(seed=3)
    with generation_head(gemma.model) as view:
        expected = generate_ids(view, ids, GREEDY, [1]).ids
    with generation_head(gemma_f64_table.model, head_on_cpu=True) as view:
        assert view.lm_head.table.dtype == torch.float64, "the table is used where and as it is"
        assert generate_ids(view, ids, GREEDY, [1]).ids == expected


def test_seeded_sampling_is_reproducible_and_leaves_the_global_rng_alone(gemma):
    ids = prompt_ids(seed=4)
    # the tiny random model is very sure of itself (p > 0.999): a high temperature makes the seed matter
    s = SamplingSettings(max_new_tokens=12, temperature=40.0, top_p=1.0, top_k=0, seed=7)
    before = torch.get_rng_state()
    with generation_head(gemma.model) as view:
        a = generate_ids(view, ids, s, stop_ids=[]).ids
        b = generate_ids(view, ids, s, stop_ids=[]).ids
        others = [generate_ids(view, ids, SamplingSettings(**{**s.__dict__, "seed": k}), stop_ids=[]).ids
                  for k in (8, 9)]
    assert a == b
    assert any(o != a for o in others), "the seed does not change the sample"
    assert torch.equal(torch.get_rng_state(), before)


def test_max_new_tokens_is_respected(gemma):
    ids = prompt_ids(seed=5)
    with generation_head(gemma.model) as view:
        for n in (1, 5):
            g = generate_ids(view, ids, SamplingSettings(max_new_tokens=n, temperature=0), stop_ids=[])
            assert len(g.ids) == n and not g.stopped
        first = generate_ids(view, ids, SamplingSettings(max_new_tokens=1, temperature=0), stop_ids=[]).ids[0]
        g = generate_ids(view, ids, SamplingSettings(max_new_tokens=6, temperature=0), stop_ids=[first])
        assert g.ids == [] and g.stopped, "a stop token ends the reply and is not part of it"


def test_cancel_within_one_token_frees_the_run(gemma_f64_table):
    ids = prompt_ids(seed=6)
    calls = []

    def on_token(done, limit):
        calls.append(done)
        if done == 3:
            raise InterruptedByUser("cancelled")

    with generation_head(gemma_f64_table.model) as view:
        full = generate_ids(view, ids, SamplingSettings(max_new_tokens=8, temperature=0), []).ids
    tables = []
    with pytest.raises(InterruptedByUser):
        with generation_head(gemma_f64_table.model) as view:
            tables.append(weakref.ref(view.lm_head.table))
            generate_ids(view, ids, SamplingSettings(max_new_tokens=8, temperature=0), [], on_token=on_token)
    assert calls == [1, 2, 3], "the hook runs after every token and the run stops at the token that raised"
    gc.collect()
    assert tables[0]() is None, "the head copy of a cancelled run is freed"
    with generation_head(gemma_f64_table.model) as view:
        again = generate_ids(view, ids, SamplingSettings(max_new_tokens=8, temperature=0), []).ids
    assert again == full, "the next run is unaffected"


def test_static_kv_cache_gives_the_same_greedy_tokens(gemma):
    ids = prompt_ids(seed=7)
    with generation_head(gemma.model) as view:
        dynamic = generate_ids(view, ids, GREEDY, [1]).ids
        static = generate_ids(view, ids, SamplingSettings(max_new_tokens=10, temperature=0, cache="static"), [1]).ids
    assert static == dynamic


def test_overflowing_logits_are_a_numerical_error(gemma_f64_table):
    from newbie_core.errors import NumericalError

    with generation_head(gemma_f64_table.model) as view:
        view.lm_head.table[5, 0] = float("nan")  # the generation-only copy: the encoder's table is untouched
        with pytest.raises(NumericalError, match="prompt enhance"):
            generate_ids(view, prompt_ids(), GREEDY, [1])
    assert torch.isfinite(gemma_f64_table.model.embed_tokens.weight).all()
