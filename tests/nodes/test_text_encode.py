"""NewBie Text Encode: core CONDITIONING, the empty negative, the embedding cache, keep_loaded, XML errors, system prompt."""
from __future__ import annotations

import pytest
import torch

POSITIVE = "1girl, blue hair, smile, looking at viewer"


@pytest.fixture
def encode(pack, text_encoders):
    """Call NewBieTextEncode.execute with a clean embedding cache; returns (positive, negative, ui text)."""
    node = pack.nodes.text_encode
    node.EMBEDDING_CACHE.clear()

    def run(positive=POSITIVE, negative="", system_prompt="auto", keep_loaded=False, custom_system_prompt="",
            encoders=None):
        out = node.NewBieTextEncode.execute(text_encoders=encoders or text_encoders, positive=positive,
                                            negative=negative, system_prompt=system_prompt, keep_loaded=keep_loaded,
                                            custom_system_prompt=custom_system_prompt)
        pos, neg = out.args
        return pos, neg, out.ui.as_dict()["text"][0]

    yield run
    node.EMBEDDING_CACHE.clear()


def loaded(mm) -> list:
    return [lm.model for lm in mm.current_loaded_models]


def check_conditioning(cond, dim: int, clip_dim: int):
    assert isinstance(cond, list) and len(cond) == 1
    feats, extra = cond[0]
    assert feats.ndim == 3 and feats.shape[0] == 1 and feats.shape[2] == dim
    assert feats.dtype == torch.float32 and feats.device.type == "cpu"
    assert set(extra) >= {"attention_mask", "pooled_output"}
    assert extra["attention_mask"].shape == feats.shape[:2]
    assert extra["pooled_output"].shape == (1, clip_dim)
    return feats, extra["attention_mask"], extra["pooled_output"]


def test_returns_two_core_conditionings(encode, text_encoders):
    pos, neg, note = encode()
    dim, clip_dim = text_encoders.gemma.hidden_size, text_encoders.jina.model.config.hidden_size
    feats, mask, pooled = check_conditioning(pos, dim, clip_dim)
    check_conditioning(neg, dim, clip_dim)
    assert int(mask.sum()) > 1 and torch.isfinite(feats).all() and torch.isfinite(pooled).all()
    # the masked tokens are the real ones: right-padded
    n = int(mask.sum())
    assert mask[0, :n].all() and not mask[0, n:].any()
    assert "0 of 2 prompts from cache" in note


def test_empty_negative_is_a_single_bos_token(encode, text_encoders):
    _, neg, _ = encode(negative="")
    feats, mask, _ = neg[0][0], neg[0][1]["attention_mask"], None
    assert int(mask.sum()) == 1
    ids, _ = text_encoders.gemma.tokenize([""])
    assert ids[0, 0].item() == text_encoders.gemma.tokenizer.token_to_id("<bos>")
    # the same features as encoding "" directly (no system prompt for the empty negative)
    direct, _ = text_encoders.gemma.encode([""])
    torch.testing.assert_close(feats[0, 0], direct[0, 0].float())


def test_repeated_prompts_come_from_cache_without_loading(encode, pack, monkeypatch):
    pos1, neg1, _ = encode(positive=POSITIVE, negative="lowres")
    calls = []
    monkeypatch.setattr(pack.nodes._comfy, "load_to_device", lambda patchers, **kw: calls.append(patchers))
    pos2, neg2, note = encode(positive=POSITIVE, negative="lowres")
    assert calls == [], "a fully cached call loaded the encoders"
    assert "2 of 2 prompts from cache" in note
    for a, b in ((pos1, pos2), (neg1, neg2)):
        assert torch.equal(a[0][0], b[0][0]) and torch.equal(a[0][1]["pooled_output"], b[0][1]["pooled_output"])
    # a prompt seen before as the positive is cached as a negative too
    _, neg3, note = encode(positive="lowres", negative=POSITIVE)
    assert calls == [] and "2 of 2 prompts from cache" in note
    assert torch.equal(neg3[0][0], pos1[0][0])


def test_a_new_prompt_loads_the_encoders_once(encode, pack, text_encoders, monkeypatch):
    encode(positive=POSITIVE, negative="")
    real = pack.nodes._comfy.load_to_device
    calls = []

    def record(patchers, **kw):
        calls.append(patchers)
        return real(patchers, **kw)

    monkeypatch.setattr(pack.nodes._comfy, "load_to_device", record)
    _, _, note = encode(positive="1boy, red eyes", negative="")
    assert "1 of 2 prompts from cache" in note
    assert calls == [[text_encoders.gemma_patcher], [text_encoders.jina_patcher]]


def test_keep_loaded_false_unloads_the_encoders(encode, comfyui, text_encoders):
    encode(keep_loaded=False)
    models = loaded(comfyui.mm)
    assert text_encoders.gemma_patcher not in models and text_encoders.jina_patcher not in models


def test_keep_loaded_true_leaves_them_with_comfyui(encode, comfyui, text_encoders):
    encode(keep_loaded=True)
    models = loaded(comfyui.mm)
    assert any(m is text_encoders.gemma_patcher for m in models)
    assert any(m is text_encoders.jina_patcher for m in models)


def test_malformed_xml_positive_names_line_and_column(encode, pack, monkeypatch):
    calls = []
    monkeypatch.setattr(pack.nodes._comfy, "load_to_device", lambda patchers, **kw: calls.append(patchers))
    bad = "<character_1>\n<n>miku</n>\n<gender>1girl</gendr>\n</character_1>"
    with pytest.raises(pack.newbie_core.errors.InputError, match=r"line \d+, column \d+") as exc:
        encode(positive=bad)
    assert "line 3" in str(exc.value)
    assert calls == [], "the encoders were loaded for a prompt that is rejected"


def test_custom_system_prompt_changes_gemma_features_only(encode):
    pos_none, _, _ = encode(system_prompt="none")
    pos_custom, _, _ = encode(system_prompt="custom", custom_system_prompt="You draw anime pictures. ")
    f_none, m_none = pos_none[0][0], pos_none[0][1]["attention_mask"]
    f_custom, m_custom = pos_custom[0][0], pos_custom[0][1]["attention_mask"]
    assert int(m_custom.sum()) > int(m_none.sum())  # the system prompt's tokens come first
    n = min(f_none.shape[1], f_custom.shape[1])
    assert not torch.allclose(f_none[:, :n], f_custom[:, :n])
    # Jina gets the raw prompt: same pooled vector
    torch.testing.assert_close(pos_none[0][1]["pooled_output"], pos_custom[0][1]["pooled_output"])


def test_custom_system_prompt_empty_equals_none(encode):
    pos_none, _, _ = encode(system_prompt="none")
    pos_custom, _, _ = encode(system_prompt="custom", custom_system_prompt="")
    assert torch.equal(pos_none[0][0], pos_custom[0][0])
