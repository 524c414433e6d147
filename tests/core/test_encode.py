"""encode_prompts / concat_embeddings: system-prompt routing, empty negative, padding invariance."""
import pytest
import torch

from newbie_core.errors import InputError
from newbie_core.text.encode import PromptEmbeddings, concat_embeddings, encode_prompts
from newbie_core.text.gemma import load_gemma
from newbie_core.text.jina import load_jina
from newbie_core.text.prompts import SYSTEM_PROMPTS
from newbie_core.tiny import TINY_GEMMA_HIDDEN, TINY_JINA_HIDDEN
from newbie_core.tiny.text import write_tiny_gemma, write_tiny_jina

POS = "1girl, blue_hair, long hair, smile, school uniform"


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_text")
    p = {**write_tiny_gemma(root), **write_tiny_jina(root)}
    return load_gemma(p["gemma_comfyui"], dtype=torch.float32), load_jina(p["jina_comfyui"], dtype=torch.float32)


def test_cond_uncond_batch_shapes_and_empty_negative(encoders):
    g, j = encoders
    e = encode_prompts(g, j, [POS, ""], "xml")
    assert isinstance(e, PromptEmbeddings) and e.batch_size == 2
    assert e.cap_feats.shape[-1] == TINY_GEMMA_HIDDEN and e.pooled.shape == (2, TINY_JINA_HIDDEN)
    assert e.cap_feats.shape[1] % 8 == 0 and e.cap_mask.dtype == torch.int64
    assert e.gemma_token_counts[1] == 1 and e.cap_lens[1] == 1  # [<bos>] only, no system prompt
    assert e.jina_token_counts[1] == 2  # [<s>, </s>]
    ids, _ = g.tokenize([""])
    torch.testing.assert_close(e.cap_feats[1, :1], g.encode([""])[0][0, :1], rtol=0, atol=1e-6)


def test_gemma_gets_system_prompt_and_jina_the_raw_prompt(encoders):
    g, j = encoders
    e = encode_prompts(g, j, [POS], "xml")
    ref_feats, ref_mask = g.encode([SYSTEM_PROMPTS["xml"] + POS])
    assert torch.equal(e.cap_mask, ref_mask)
    torch.testing.assert_close(e.cap_feats, ref_feats, rtol=0, atol=1e-6)
    torch.testing.assert_close(e.pooled, j.encode([POS]), rtol=0, atol=1e-6)
    assert e.gemma_token_counts[0] > e.jina_token_counts[0]


def test_prompt_alone_equals_prompt_inside_padded_batch(encoders):
    g, j = encoders
    alone = encode_prompts(g, j, ["cat"], "tags")
    batch = encode_prompts(g, j, ["cat", POS + ", " + POS], "tags")
    n = alone.cap_lens[0]
    assert batch.cap_lens[0] == n and batch.cap_feats.shape[1] > alone.cap_feats.shape[1]
    torch.testing.assert_close(batch.cap_feats[0, :n], alone.cap_feats[0, :n], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch.pooled[:1], alone.pooled, rtol=1e-5, atol=1e-5)


def test_concat_right_pads_separately_encoded_prompts(encoders):
    g, j = encoders
    cond = encode_prompts(g, j, [POS + ", " + POS], "xml")
    uncond = encode_prompts(g, j, [""], "xml")
    both = concat_embeddings([cond, uncond])
    L = cond.cap_feats.shape[1]
    assert both.cap_feats.shape == (2, L, TINY_GEMMA_HIDDEN) and both.cap_mask.shape == (2, L)
    assert both.cap_lens == [cond.cap_lens[0], 1]
    assert (both.cap_feats[1, uncond.cap_feats.shape[1]:] == 0).all() and both.cap_mask[1, 1:].sum() == 0
    torch.testing.assert_close(both.cap_feats[0], cond.cap_feats[0], rtol=0, atol=0)
    torch.testing.assert_close(both.pooled, torch.cat([cond.pooled, uncond.pooled]), rtol=0, atol=0)
    assert both.gemma_token_counts == cond.gemma_token_counts + uncond.gemma_token_counts
    batch = encode_prompts(g, j, [POS + ", " + POS, ""], "xml")
    torch.testing.assert_close(both.cap_feats[1, :1], batch.cap_feats[1, :1], rtol=1e-5, atol=1e-5)


def test_concat_refuses_mismatched_widths(encoders):
    g, j = encoders
    e = encode_prompts(g, j, ["cat"], "none")
    other = PromptEmbeddings(torch.zeros(1, 8, 3), torch.ones(1, 8, dtype=torch.long), torch.zeros(1, TINY_JINA_HIDDEN))
    with pytest.raises(InputError):
        concat_embeddings([e, other])


def test_string_instead_of_list_is_an_input_error(encoders):
    g, j = encoders
    with pytest.raises(InputError):
        encode_prompts(g, j, "1girl", "xml")
