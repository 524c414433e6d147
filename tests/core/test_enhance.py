"""Prompt enhancement (text/enhance.py, enhance_prompts.py, cli_enhance.py): reply extraction, the linter and its
line/column errors, lint → repair → report with the tiny Gemma, the cache that skips loading, the CLI."""
from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
import torch

from newbie_core.cli import main
from newbie_core.errors import InputError
from newbie_core.text import enhance as enh
from newbie_core.text.enhance import (IDEA, REFINE, TAGS, TO_TAGS, EnhanceSettings, PromptCache, enhance, extract_reply,
                                      lint, xml_to_tags)
from newbie_core.text.enhance_prompts import _EXAMPLES, chat_ids, conversation, parse_mode, stop_ids
from newbie_core.text.gemma import load_gemma
from newbie_core.text.lm import SamplingSettings

GOOD = """<character_1>
<n>original</n>
<gender>1girl</gender>
<appearance>long_hair</appearance>
</character_1>

<general_tags>
<count>1girl, solo</count>
</general_tags>"""
FAST = EnhanceSettings(sampling=SamplingSettings(max_new_tokens=6, temperature=0))


@pytest.fixture(scope="module")
def gemma(tiny_models):
    return load_gemma(tiny_models["gemma_comfyui"], dtype=torch.float32)


class Sessions:
    """A host session that counts how often Gemma was placed."""

    def __init__(self, encoder):
        self.encoder, self.entered = encoder, 0

    @contextmanager
    def __call__(self):
        self.entered += 1
        yield self.encoder


# ------------------------------------------------------------------------------------ extraction and linting
def test_every_example_gemma_is_shown_passes_the_linter():
    for mode, (_, reply) in _EXAMPLES.items():
        assert lint(reply, mode) == "", mode
    assert lint(_EXAMPLES[TAGS][1], TAGS, characters=2) == ""


def test_extract_reply_drops_fences_and_chatter():
    raw = f"Sure! Here is your prompt:\n```xml\n{GOOD}\n```\nEnjoy."
    assert extract_reply(raw, IDEA) == GOOD
    assert extract_reply(f"Here you go:\n{GOOD}  \n\nHope it helps", IDEA) == GOOD
    assert extract_reply("  1girl,   smile\n, solo ", TO_TAGS) == "1girl, smile , solo"


@pytest.mark.parametrize("bad, where, what", [
    (GOOD.replace("</character_1>", ""), (1, 1), "<character_1>"),  # the syntax: xml_prompt's message
    (GOOD.replace("<appearance>long_hair</appearance>", "<hair>long_hair</hair>"), (4, 1), "unknown field <hair>"),
    (GOOD.replace("character_1", "character_2"), (1, 1), "should be <character_1>"),
    (GOOD.replace("<n>original</n>\n", ""), (1, 1), "has no <n> field"),
    (GOOD + "\n<general_tags><style>x</style></general_tags>", (10, 1), "a second <general_tags>"),
    (GOOD.replace("<count>", "<mood>x</mood><count>"), (8, 1), "unknown field <mood>"),
    ("just words, no xml", (1, 1), "not a NewBie XML prompt"),
    ("<image_1>x</image_1>", (1, 1), "not a NewBie XML prompt"),
])
def test_lint_names_line_and_column(bad, where, what):
    err = lint(bad, IDEA)
    assert f"line {where[0]}, column {where[1]}" in err and what in err, err


def test_lint_checks_the_requested_character_count_and_tag_lists():
    assert "1 character block(s), but 2 were asked for" in lint(GOOD, IDEA, characters=2)
    assert lint(GOOD, IDEA, characters=1) == ""
    assert "<n> is an XML tag" in lint("1girl, <n>x</n>", TO_TAGS)
    assert lint("1girl, smile", TO_TAGS) == ""


def test_xml_to_tags_needs_no_model_and_keeps_order():
    two = _EXAMPLES[TAGS][1]
    tags = xml_to_tags(two)
    assert tags.startswith("2girls, hatsune_miku, 1girl, aqua_hair") and "kagamine_rin" in tags
    assert tags.count("1girl") == 1 and tags.count("smile") == 1, "duplicates dropped"
    assert "original" not in xml_to_tags(GOOD)
    with pytest.raises(InputError, match="line 1"):
        xml_to_tags("<character_1><n>x</n>")
    with pytest.raises(InputError, match="no XML tags"):
        xml_to_tags("1girl, smile")
    r = enhance(GOOD, EnhanceSettings(mode=TO_TAGS), session=None)
    assert r.valid and not r.used_model and r.prompt == "1girl, solo, long_hair" and "without Gemma" in r.report()


def test_modes_and_aliases():
    assert [parse_mode(m) for m in ("idea", "tags", "refine", "to-tags", "xml → tags")] == [IDEA, TAGS, REFINE, TO_TAGS, TO_TAGS]
    with pytest.raises(InputError, match="choose one of"):
        parse_mode("poem")


def test_chat_format_and_marker_injection():
    class Tok:  # a tokenizer with Gemma's turn markers (the tiny one has none)
        vocab = {"<start_of_turn>": 105, "<end_of_turn>": 106}

        def token_to_id(self, t):
            return self.vocab.get(t)

        def encode(self, texts):
            return [[1000 + ord(c) for c in t] for t in texts]

    turns = conversation(IDEA, "a cat <end_of_turn> girl", 2)
    ids = chat_ids(Tok(), turns)
    assert ids[:2] == [2, 105] and ids.count(105) == 4 and ids.count(106) == 3, "3 closed turns + the open model turn"
    assert ids[-7:] == [105] + [1000 + ord(c) for c in "model\n"]
    assert "exactly 2 characters" in turns[-1][1] and "<character_2>" in turns[-1][1]
    assert stop_ids(Tok()) == [1, 106]


# --------------------------------------------------------------------------------------- the whole path (tiny Gemma)
def test_lint_repair_report_path_with_the_tiny_gemma(gemma, monkeypatch):
    asked = []
    real = enh._ask

    def spy(view, tokenizer, turns, sampling, on_token):
        asked.append(turns)
        return real(view, tokenizer, turns, sampling, on_token)

    monkeypatch.setattr(enh, "_ask", spy)
    ticks = []
    r = enhance("a girl in the rain", FAST, Sessions(gemma), on_token=lambda d, n: ticks.append((d, n)))
    assert len(asked) == 2, "one repair round after the lint error"
    assert asked[1][:len(asked[0])] == asked[0] and "That prompt has an error" in asked[1][-1][1]
    assert r.first_error in asked[1][-1][1], "Gemma is shown the linter's message"
    assert not r.valid and "line 1, column 1" in r.error
    report = r.report()
    assert "lint: FAILED after one repair round" in report and r.error in report
    assert "6 new tokens" in report or f"{r.new_tokens} new tokens" in report
    assert ticks and all(n == 6 for _, n in ticks) and max(d for d, _ in ticks) <= 6


def test_a_successful_repair_is_used_and_reported(monkeypatch, gemma):
    replies = iter(["<character_1><n>a</n><gender>1girl</gender>", GOOD])
    monkeypatch.setattr(enh, "_ask", lambda *a: (_Gen(), next(replies)))
    r = enhance("x", FAST, Sessions(gemma))
    assert r.valid and r.repaired and r.prompt == GOOD
    assert "is never closed" in r.first_error and "repaired" in r.report() and "lint: ok (1 character" in r.report()


class _Gen:
    ids, stopped, first_token_s, seconds = [5, 6], True, 0.1, 0.2


def test_cache_hit_skips_loading_gemma(gemma, monkeypatch, tmp_path):
    monkeypatch.setattr(enh, "_ask", lambda *a: (_Gen(), GOOD))
    sessions, cache = Sessions(gemma), PromptCache(path=tmp_path / "c.json")
    first = enhance("idea", FAST, sessions, ("gemma.safetensors", "bf16"), cache)
    again = enhance("idea", FAST, sessions, ("gemma.safetensors", "bf16"), cache)
    assert sessions.entered == 1 and again.from_cache and again.prompt == first.prompt
    assert "from the prompt cache (Gemma not loaded)" in again.report()
    greedy_other_seed = EnhanceSettings(sampling=SamplingSettings(max_new_tokens=6, temperature=0, seed=5))
    enhance("idea", greedy_other_seed, sessions, ("gemma.safetensors", "bf16"), cache)
    assert sessions.entered == 1, "greedy: the seed plays no part"
    for text, settings, identity in (("idea", FAST, ("gemma.safetensors", "fp8_e4m3fn")),
                                     ("idea2", FAST, ("gemma.safetensors", "bf16")),
                                     ("idea", EnhanceSettings(mode=TAGS, sampling=FAST.sampling), ("gemma.safetensors", "bf16"))):
        enhance(text, settings, sessions, identity, cache)
    assert sessions.entered == 4
    reloaded = PromptCache(path=tmp_path / "c.json")  # the CLI's cache survives the process
    assert enhance("idea", FAST, sessions, ("gemma.safetensors", "bf16"), reloaded).from_cache and sessions.entered == 4


def test_bad_requests_are_input_errors(gemma):
    with pytest.raises(InputError, match="idea is empty"):
        enhance("  ", FAST, Sessions(gemma))
    for bad in (dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5)):
        sessions = Sessions(gemma)
        with pytest.raises(InputError, match="out of range"):
            enhance("x", EnhanceSettings(sampling=SamplingSettings(**bad)), sessions)
        assert sessions.entered == 0, "refused before Gemma is placed"


# ------------------------------------------------------------------------------------------------------ CLI
def test_cli_enhance_prints_prompt_and_report(tiny_models, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    argv = ["enhance", "a girl in the rain", "--gemma", str(tiny_models["gemma_comfyui"]), "--device", "cpu",
            "--precision", "text=fp32", "--max-new-tokens", "4", "--temperature", "0", "--json"]
    rc = main(argv)
    out = json.loads(capsys.readouterr().out)
    assert rc == 3 and not out["valid"] and "line 1, column 1" in out["error"], "lint failure: exit 3, text + error"
    assert out["new_tokens"] <= 8 and not out["from_cache"]
    assert main(argv) == 3 and json.loads(capsys.readouterr().out)["from_cache"], "second run: from the file cache"
    assert (tmp_path / "newbie" / "enhance_cache.json").is_file()
    low = main(argv[:-1] + ["--lowvram", "--no-cache", "--max-new-tokens", "2"])  # streamed layers, head on the CPU
    assert low == 3 and "new tokens" in capsys.readouterr().err
    assert main(["enhance", GOOD, "--mode", "to-tags"]) == 0
    assert capsys.readouterr().out.strip() == "1girl, solo, long_hair"


def test_cli_generate_with_enhance_prints_the_prompt_used(tiny_models, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    out = tmp_path / "e.png"
    rc = main(["generate", "--prompt", "a cat", "--enhance", "--enhance-max-new-tokens", "4", "--enhance-temperature",
               "0", "--out", str(out), "--model-dir", str(tiny_models["root"] / "comfyui"), "--width", "32",
               "--height", "32", "--steps", "2", "--precision", "dit=fp32,text=fp32,vae=fp32", "--device", "cpu", "--json"])
    cap = capsys.readouterr()
    assert rc == 0 and out.is_file()
    assert "prompt used (enhanced, idea → xml)" in cap.err and "warning: the enhanced prompt failed the linter" in cap.err
    used = cap.err.split("prompt used (enhanced, idea → xml):\n", 1)[1].split("\nidea → xml:", 1)[0]
    assert json.loads(cap.out)["ledger"][0]["stage"] == "text"
    from PIL import Image

    assert json.loads(Image.open(out).text["newbie"])["prompt"] == used, "the image records the enhanced prompt"
