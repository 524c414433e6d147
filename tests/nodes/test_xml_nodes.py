"""XML prompt builder nodes: character + general tags + assemble → a valid NewBie XML prompt; errors with line/column."""
from __future__ import annotations

import re

import pytest


@pytest.fixture
def xml(pack):
    return pack.nodes.xml_prompt


def character(xml, index=1, **fields):
    values = dict(name="", gender="1girl", appearance="", clothing="", expression="", action="", interaction="",
                  position="")
    values.update(fields)
    return xml.NewBieXMLCharacter.execute(index=index, **values).args[0]


def general(xml, **fields):
    values = {k: "" for k in xml.GENERAL_TIPS}
    values.update(fields)
    return xml.NewBieXMLGeneralTags.execute(**values).args[0]


def assemble(xml, **inputs):
    return xml.NewBieXMLAssemble.execute(**inputs).args[0]


def test_character_general_and_assemble_make_a_valid_prompt(pack, xml):
    miku = character(xml, 1, name="hatsune_miku", appearance="twintails,\n  aqua_hair", clothing="detached_sleeves",
                     expression="smile", position="left")
    rin = character(xml, 2, name="kagamine_rin", gender="1girl", action="waving", position="right")
    tags = general(xml, count="2girls", style="anime_style", background="stage", quality="masterpiece, best_quality")
    prompt = assemble(xml, character_1=miku, character_2=rin, general_tags=tags)

    parsed = pack.newbie_core.text.xml_prompt.parse_xml_prompt(prompt)
    assert parsed["characters"] == [
        {"n": "hatsune_miku", "gender": "1girl", "appearance": "twintails, aqua_hair", "clothing": "detached_sleeves",
         "expression": "smile", "position": "left"},
        {"n": "kagamine_rin", "gender": "1girl", "action": "waving", "position": "right"},
    ]
    assert parsed["general_tags"] == {"count": "2girls", "style": "anime_style", "background": "stage",
                                      "quality": "masterpiece, best_quality"}
    assert parsed["other"] == {}
    # README form: blocks in order, separated by a blank line, no root tag
    assert prompt.startswith("<character_1>") and prompt.endswith("</general_tags>")
    assert prompt.index("<character_1>") < prompt.index("<character_2>") < prompt.index("<general_tags>")
    assert "\n\n<character_2>" in prompt and "\n\n<general_tags>" in prompt
    # NewBie Text Encode's "auto" picks the XML system prompt for it
    prompts = pack.newbie_core.text.prompts
    assert prompts.resolve_system_prompt("auto", prompt) == prompts.SYSTEM_PROMPTS["xml"]


def test_character_block_writes_name_and_gender_and_skips_empty_fields(xml):
    block = character(xml, 3, name="", gender="", appearance="red_eyes")
    assert block.splitlines()[0] == "<character_3>" and block.splitlines()[-1] == "</character_3>"
    assert "<n></n>" in block and "<gender>1girl</gender>" in block and "<appearance>red_eyes</appearance>" in block
    for empty in ("clothing", "expression", "action", "interaction", "position"):
        assert f"<{empty}>" not in block


def test_general_tags_leave_out_empty_fields(xml):
    block = general(xml, lighting="rim_light")
    assert block.splitlines() == ["<general_tags>", "  <lighting>rim_light</lighting>", "</general_tags>"]


def test_assemble_skips_missing_characters_and_appends_extra(pack, xml):
    only = character(xml, 2, name="kaito", gender="1boy")
    prompt = assemble(xml, character_2=only, extra="  <caption>a boy on a stage</caption>  ")
    assert prompt.endswith("\n\n<caption>a boy on a stage</caption>")
    parsed = pack.newbie_core.text.xml_prompt.parse_xml_prompt(prompt)
    assert [c["n"] for c in parsed["characters"]] == ["kaito"]
    assert parsed["other"] == {"caption": "a boy on a stage"}
    assert assemble(xml, extra="1girl, solo") == "1girl, solo"  # plain tags are fine as extra


def test_malformed_extra_xml_names_line_and_column(pack, xml):
    body = assemble(xml, character_1=character(xml, 1, name="miku"), general_tags=general(xml, count="1girl"))
    extra_line = body.count("\n") + 3  # after the blank line that separates the extra text
    with pytest.raises(pack.newbie_core.errors.InputError) as exc:
        assemble(xml, character_1=character(xml, 1, name="miku"), general_tags=general(xml, count="1girl"),
                 extra="<mood>happy</mod>")
    msg = str(exc.value)
    m = re.search(r"line (\d+), column (\d+)", msg)
    assert m, msg
    assert int(m.group(1)) == extra_line and int(m.group(2)) == 1
    assert "<mood>happy</mod>" in msg  # the offending line is quoted


def test_malformed_value_inside_a_block_is_reported(pack, xml):
    bad = character(xml, 1, name="miku", appearance="<b>blue_hair")  # an unclosed tag typed into a field
    with pytest.raises(pack.newbie_core.errors.InputError, match=r"line 4, column 15: <b> is not closed"):
        assemble(xml, character_1=bad)
