"""NewBie Text Encoder Loader's `jina_max_length` (512 HF pipeline / 2048 official demo) through the nodes."""
from __future__ import annotations

import torch

LONG = ", ".join(f"tag{i} word{i}" for i in range(1500))  # far over 512 Jina tokens with the tiny tokenizer


def test_loader_default_is_512_and_the_option_reaches_jina(loaders, pack, comfy_models):
    node = pack.nodes.loaders.NewBieTextEncoderLoader
    inp = next(i for i in node.GET_SCHEMA().inputs if i.id == "jina_max_length")
    assert inp.optional and inp.default == 512  # optional: workflows saved before it still load
    default = loaders.text_encoders(precision="fp32")
    assert default.jina.max_length == 512
    long = node.execute(gemma_name=comfy_models["gemma"], jina_name=comfy_models["jina"], precision="fp32",
                        device="default", jina_max_length=2048).args[0]
    assert long.jina.max_length == 2048
    assert long.jina.tokenize([LONG])[0].shape[1] == 2048
    assert default.jina.tokenize([LONG])[0].shape[1] == 512


def test_another_jina_limit_is_not_served_from_the_cache(pack, comfy_models):
    loader, enc_node = pack.nodes.loaders.NewBieTextEncoderLoader, pack.nodes.text_encode
    enc_node.EMBEDDING_CACHE.clear()
    try:
        pooled = {}
        for n in (512, 2048, 512):
            encoders = loader.execute(gemma_name=comfy_models["gemma"], jina_name=comfy_models["jina"],
                                      precision="fp32", device="default", jina_max_length=n).args[0]
            out = enc_node.NewBieTextEncode.execute(text_encoders=encoders, positive=LONG, negative="",
                                                    system_prompt="none", keep_loaded=False, custom_system_prompt="")
            note = out.ui.as_dict()["text"][0]
            pooled.setdefault(n, []).append((out.args[0][0][1]["pooled_output"], note))
        (first, note1), (again, note3) = pooled[512]
        (longer, note2), = pooled[2048]
        assert note1.startswith("0 of 2 prompts from cache") and note2.startswith("0 of 2 prompts from cache")
        assert note3.startswith("2 of 2 prompts from cache")  # same limit again: both from the cache
        assert torch.equal(first, again) and not torch.allclose(first, longer)
    finally:
        enc_node.EMBEDDING_CACHE.clear()
