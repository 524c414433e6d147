"""XML prompt building and validation (spec §6)."""
import pytest

from newbie_core.errors import InputError
from newbie_core.text.prompts import auto_preset
from newbie_core.text.xml_prompt import (assemble_xml_prompt, character_block, general_tags_block, parse_xml_prompt,
                                         validate_xml_prompt)


def test_character_block_readme_form():
    block = character_block(1, name="$character_1$", gender="1girl", appearance=["chibi", "red_eyes"],
                            expression="happy,  smile", position="center_left")
    assert block == ("<character_1>\n<n>$character_1$</n>\n<gender>1girl</gender>\n"
                     "<appearance>chibi, red_eyes</appearance>\n<expression>happy, smile</expression>\n"
                     "<position>center_left</position>\n</character_1>")


def test_character_block_always_has_name_and_gender():
    assert character_block(2) == "<character_2>\n<n></n>\n<gender>1girl</gender>\n</character_2>"
    with pytest.raises(InputError):
        character_block(0)


def test_general_tags_block_omits_empty_fields_and_rejects_unknown():
    block = general_tags_block(count="2girls, multiple_girls", style="anime_style", other="alternate_costume", lighting="")
    assert block == ("<general_tags>\n<count>2girls, multiple_girls</count>\n<style>anime_style</style>\n"
                     "<other>alternate_costume</other>\n</general_tags>")
    with pytest.raises(InputError, match="colour"):
        general_tags_block(colour="red")


def test_assembled_prompt_validates_and_parses():
    prompt = assemble_xml_prompt([character_block(1, "a", appearance="blue_hair"), character_block(2, "b")],
                                 general_tags_block(count="2girls", quality="high_resolution"))
    assert "</character_1>\n\n<character_2>" in prompt and auto_preset(prompt) == "xml"
    parsed = parse_xml_prompt(prompt)
    assert [c["n"] for c in parsed["characters"]] == ["a", "b"]
    assert parsed["characters"][0]["appearance"] == "blue_hair"
    assert parsed["general_tags"] == {"count": "2girls", "quality": "high_resolution"}


def test_official_image_form_with_style_prefix():
    prompt = assemble_xml_prompt([character_block(1, "a")], general_tags_block(count="1girl"), caption="a girl",
                                 style_prefix="style of mikozin", root="image")
    assert prompt.startswith("<style>style of mikozin</style>\n\n<image>\n<caption>a girl</caption>\n<character_1>")
    parsed = parse_xml_prompt(prompt)
    assert parsed["other"]["style"] == "style of mikozin"


def test_danbooru_emoticons_and_ampersand_are_tolerated():
    validate_xml_prompt("<character_1>\n<expression>>_<, smile & laugh, :></expression>\n</character_1>")


def _err(prompt):
    with pytest.raises(InputError) as e:
        validate_xml_prompt(prompt)
    return str(e.value)


def test_unclosed_tag_reports_line_column_and_text():
    msg = _err("<character_1>\n<n>miku</n>\n  <gender>1girl\n</character_1>")
    assert "line 3, column 3" in msg and "  <gender>1girl" in msg


def test_never_closed_block():
    msg = _err("<character_1>\n<n>miku</n>\n\n<general_tags>\n<count>1girl</count>\n</general_tags>")
    assert "line 1, column 1" in msg and "<character_1> is never closed" in msg


def test_stray_closing_tag():
    msg = _err("<n>a</n>\n</character_2>")
    assert "line 2, column 1" in msg and "never opened" in msg


def test_malformed_tag_from_the_parser_has_position():
    msg = _err("<character_1>\n<n>a</n>\n<clothing>dress <lora:x:1></clothing>\n</character_1>")
    assert "line 3" in msg and "<lora:x:1>" in msg and "column" in msg
