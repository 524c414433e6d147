"""System-prompt rules (spec §3.3/§3.4) and the shared tokenizer settings."""
import logging

import pytest

from newbie_core.errors import InputError
from newbie_core.text.prompts import (GEMMA_SPEC, JINA_SPEC, SYSTEM_PROMPTS, TextTokenizer, auto_preset, gemma_text,
                                      looks_like_xml, resolve_system_prompt, tokenize_batch)
from newbie_core.tiny.text import _gemma_tokenizer_json, _train_spm

XML = "You are an assistant designed to generate high-quality anime images based on xml format prompts. <Prompt Start> "
TAGS = ("You are an assistant designed to generate high-quality anime images with the highest degree of image-text "
        "alignment based on textual prompts. <Prompt Start> ")
DEMO = "You are an assistant designed to generate high-quality images based on user prompts."


def test_presets_are_verbatim_including_trailing_space():
    assert SYSTEM_PROMPTS == {"xml": XML, "tags": TAGS, "demo": DEMO, "none": ""}


def test_empty_prompt_gets_no_system_prompt():
    for system in ("xml", "tags", "demo", "custom system. "):
        assert gemma_text("", system) == ""
        assert gemma_text("   \n", system) == ""


def test_non_empty_prompt_is_system_plus_prompt_without_separator():
    assert gemma_text("1girl", "xml") == XML + "1girl"
    assert gemma_text("1girl", "demo") == DEMO + "1girl"
    assert gemma_text("1girl", "none") == "1girl"
    assert gemma_text("1girl", None) == "1girl"
    assert gemma_text("1girl", "My system: ") == "My system: 1girl"


def test_auto_preset_picks_xml_for_xml_prompts():
    xml = "<character_1>\n<n>miku</n>\n</character_1>"
    assert looks_like_xml(xml) and auto_preset(xml) == "xml"
    assert not looks_like_xml("1girl, >_<, smile") and auto_preset("1girl, smile") == "tags"
    assert not looks_like_xml("<lonely tag without end")
    assert resolve_system_prompt("auto", xml) == XML
    assert gemma_text("1girl", "auto") == TAGS + "1girl"


@pytest.fixture(scope="module")
def gemma_tok():
    import tokenizers
    model = _train_spm(1, vocab_size=420, model_type="bpe", pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
                       eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", byte_fallback=True,
                       add_dummy_prefix=False, normalization_rule_name="identity", remove_extra_whitespaces=False)
    return TextTokenizer(_gemma_tokenizer_json(model), "tokenizers", "test")


def test_empty_prompt_tokenizes_to_bos_only_padded_to_8(gemma_tok):
    ids, mask = tokenize_batch(gemma_tok, GEMMA_SPEC, [""])
    assert ids.tolist() == [[2, 0, 0, 0, 0, 0, 0, 0]]
    assert mask.tolist() == [[1, 0, 0, 0, 0, 0, 0, 0]]


def test_batch_is_right_padded_to_a_multiple_of_8(gemma_tok):
    ids, mask = tokenize_batch(gemma_tok, GEMMA_SPEC, ["1girl, smile, blue hair, long hair", "cat"])
    assert ids.shape[1] % 8 == 0 and ids[:, 0].tolist() == [2, 2]
    n = int(mask[1].sum())
    assert mask[1, :n].all() and not mask[1, n:].any() and (ids[1, n:] == 0).all()
    assert 1 not in ids[mask.bool()].tolist()  # no EOS


def test_truncation_warns_with_count_and_cut_point(gemma_tok, caplog):
    text = " ".join(["girl"] * 700) + " zzzlast"
    with caplog.at_level(logging.WARNING, logger="newbie_core.text.prompts"):
        ids, mask = tokenize_batch(gemma_tok, GEMMA_SPEC, [text])
    assert ids.shape == (1, 512) and mask.all()
    msg = caplog.text
    n = len(gemma_tok.encode([text])[0]) + 1
    assert f"is {n} tokens long" in msg and "first 512" in msg and "girl" in msg and "cut after" in msg


def test_jina_truncation_keeps_eos(gemma_tok):
    ids, mask = tokenize_batch(gemma_tok, JINA_SPEC, [" ".join(["girl"] * 700)])
    assert ids.shape == (1, 512) and ids[0, 0] == 0 and ids[0, -1] == 2


def test_single_string_is_rejected(gemma_tok):
    with pytest.raises(InputError):
        tokenize_batch(gemma_tok, GEMMA_SPEC, "1girl")
