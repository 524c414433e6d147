"""NewBie Prompt Enhance in-process: outputs and report, lint → repair → message, the cache that skips placing Gemma,
keep_loaded, cancel within one token through ComfyUI's interrupt, out-of-memory → the pack's message."""
from __future__ import annotations

import sys

import pytest
import torch

GOOD = "<character_1>\n<n>original</n>\n<gender>1girl</gender>\n</character_1>\n\n<general_tags>\n<count>1girl, solo</count>\n</general_tags>"


@pytest.fixture
def node(pack):
    mod = pack.nodes.prompt_enhance
    mod.PROMPT_CACHE._items.clear()
    yield mod
    mod.PROMPT_CACHE._items.clear()


def run(node, text_encoders, idea="a girl in the rain", mode="idea → xml", max_new_tokens=16, temperature=0.0,
        seed=0, keep_loaded=False, **kw):
    out = node.NewBiePromptEnhance.execute(text_encoders=text_encoders, idea=idea, mode=mode,
                                           max_new_tokens=max_new_tokens, temperature=temperature, top_p=0.9,
                                           seed=seed, keep_loaded=keep_loaded, **kw)
    prompt, report = out.args
    return prompt, report, out.ui.as_dict()["text"][0]


def gemma_loaded(mm, enc) -> bool:
    return any(lm.model is enc.gemma_patcher for lm in mm.current_loaded_models)


def test_schema(pack):
    schema = pack.nodes.prompt_enhance.NewBiePromptEnhance.define_schema()
    assert schema.category == "NewBie/prompt" and schema.node_id in pack.nodes.node_ids()
    assert [i.id for i in schema.inputs] == ["text_encoders", "idea", "mode", "max_new_tokens", "temperature", "top_p",
                                             "seed", "keep_loaded", "characters", "compiled_decode"]
    assert all(i.tooltip for i in schema.inputs) and [o.display_name for o in schema.outputs] == ["prompt", "report"]


def test_lint_failure_comes_back_with_line_and_column_and_gemma_is_unloaded(node, comfyui, text_encoders, monkeypatch):
    placed = []
    real = node._comfy.load_to_device
    monkeypatch.setattr(node._comfy, "load_to_device", lambda p, **k: (placed.append(p), real(p, **k)))
    prompt, report, shown = run(node, text_encoders)
    assert placed == [[text_encoders.gemma_patcher]], "placed once through ComfyUI's memory manager"
    assert "lint: FAILED after one repair round" in report and "line 1, column 1" in report
    assert report in shown and isinstance(prompt, str)
    assert not gemma_loaded(comfyui.mm, text_encoders), "unloaded after the run (keep_loaded off)"
    again, report2, _ = run(node, text_encoders)
    assert again == prompt and "from the prompt cache (Gemma not loaded)" in report2 and len(placed) == 1
    run(node, text_encoders, idea="another idea", keep_loaded=True)
    assert gemma_loaded(comfyui.mm, text_encoders) and len(placed) == 2


def test_xml_to_tags_needs_no_model(node, text_encoders, monkeypatch):
    monkeypatch.setattr(node._comfy, "load_to_device", lambda *a, **k: pytest.fail("Gemma was placed"))
    prompt, report, _ = run(node, text_encoders, idea=GOOD, mode="xml → tags")
    assert prompt == "1girl, solo" and "converted without Gemma" in report and "lint: ok" in report


def test_cancel_stops_within_one_token_and_unloads(node, comfyui, text_encoders, monkeypatch):
    mm = comfyui.mm
    ticks = []

    class Bar:
        def update_absolute(self, value, total=None, preview=None):
            ticks.append(value)
            if value == 2:
                mm.interrupt_current_processing(True)  # the user presses Cancel during token 2

    monkeypatch.setattr(node._comfy, "progress_bar", lambda total: Bar())
    with pytest.raises(mm.InterruptProcessingException):
        run(node, text_encoders, idea="cancel me")
    assert ticks == [1, 2], "the cancel point before the next token's progress tick stopped the run"
    assert not gemma_loaded(mm, text_encoders) and not mm.processing_interrupted()
    monkeypatch.undo()
    _, report, _ = run(node, text_encoders, idea="cancel me")
    assert "new tokens" in report, "the next run works and was not cached from the cancelled one"


def test_out_of_memory_gives_the_packs_message(node, comfyui, pack, text_encoders, monkeypatch):
    class Bar:
        def update_absolute(self, value, total=None, preview=None):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(node._comfy, "progress_bar", lambda total: Bar())
    with pytest.raises(torch.OutOfMemoryError) as e:
        run(node, text_encoders, idea="too big")
    assert isinstance(e.value, pack.newbie_core.errors.StageOutOfMemoryError)
    assert "text encoding" in str(e.value) and "fp8_e4m3fn" in str(e.value)
    assert not comfyui.mm.current_loaded_models


def test_fp8_gemma_generates_in_bf16_with_the_table_kept_on_the_cpu(node, loaders, monkeypatch):
    """fp8 storage (Linear weights fp8): the view computes in bf16; the embedding table stays on the CPU in its
    file dtype outside ComfyUI's patcher (as in the CLI), so the head is a bf16 copy exactly when the file's
    dtype is not bf16."""
    enc = loaders.text_encoders(precision="fp8_e4m3fn")
    assert enc.gemma.model.layers[0].mlp.up_proj.weight.dtype == torch.float8_e4m3fn
    heads = []
    enhance_module = sys.modules[node.EnhanceSettings.__module__]  # where the node's enhancement runs
    real = enhance_module.generation_head

    def spy(model, head_on_cpu=False):
        cm = real(model, head_on_cpu)
        view = cm.__enter__()
        heads.append((view.dtype, view.lm_head.table.data_ptr() == model.embed_tokens.weight.data_ptr()))
        return _Entered(cm, view)

    monkeypatch.setattr(enhance_module, "generation_head", spy)
    _, report, _ = run(node, enc, idea="fp8 idea")
    shared = enc.gemma.model.embed_tokens.weight.dtype == torch.bfloat16
    assert heads and all(h == (torch.bfloat16, shared) for h in heads) and "new tokens" in report


class _Entered:
    def __init__(self, cm, view):
        self.cm, self.view = cm, view

    def __enter__(self):
        return self.view

    def __exit__(self, *exc):
        return self.cm.__exit__(*exc)


@pytest.mark.parametrize("compiled, cache", [(False, "dynamic"), (True, "static")])
def test_compiled_decode_picks_the_static_kv_cache(node, text_encoders, monkeypatch, compiled, cache):
    """The node's compiled_decode input reaches the generation settings (static cache = compiled decode step)."""
    seen = []
    real = node.stages.enhance_prompt

    def spy(host, cache_, idea, settings, identity, on_token=None, **kw):
        seen.append(settings.sampling.cache)
        return real(host, cache_, idea, settings, identity, on_token, **kw)

    monkeypatch.setattr(node.stages, "enhance_prompt", spy)
    run(node, text_encoders, idea=f"compiled {compiled}", compiled_decode=compiled) if compiled else \
        run(node, text_encoders, idea="plain")
    assert seen == [cache]
