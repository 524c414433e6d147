"""The XML linter runs in linear time with a size cap, and finds the same tags as the old (backtracking) pattern."""
from __future__ import annotations

import random
import re
import time

import pytest

from newbie_core.errors import InputError
from newbie_core.text.prompts import looks_like_xml
from newbie_core.text.xml_prompt import MAX_XML_CHARS, scan_tags, validate_xml_prompt

# The pattern the scanner replaced: fine on short strings, cubic on "<a>b</a> <c" + spaces. Used as the oracle.
_OLD_TAG = re.compile(r"<(/?)([A-Za-z_][\w.\-]*)((?:\s+[^<>]*?)?)\s*(/?)>")


def test_scanner_finds_what_the_old_pattern_found():
    rng = random.Random(0)
    alphabet = ["<", ">", "/", " ", "\n", "a", "b", "_", "1", "-", ".", "=", '"', "&"]
    for _ in range(3000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        old = [(m.start(), bool(m.group(1)), m.group(2), bool(m.group(4))) for m in _OLD_TAG.finditer(s)]
        assert list(scan_tags(s)) == old, s


def _call(fn, text: str) -> None:
    """One lint of `text`; a refusal (InputError) is a finished lint too."""
    try:
        fn(text)
    except InputError:
        pass


def _time(fn, text: str, calls: int, reps: int = 5) -> float:
    """Best-of-`reps` CPU time of `calls` lints (the machine is shared: the best run is the least disturbed one)."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.process_time()
        for _ in range(calls):
            _call(fn, text)
        best = min(best, time.process_time() - t0)
    return best


ADVERSARIAL = {  # each built to a given size from a repeated unit
    "spaces after an unclosed tag": lambda n: "<a>b</a> <c" + " " * (n - 11),
    "many unclosed tags": lambda n: "<a>" * (n // 3),
    "tags with long attributes": lambda n: ("<a" + " " * 50 + "x") * (n // 53),
    "lone < and &": lambda n: "<&" * (n // 2),
    "deep nesting": lambda n: "<a>" * (n // 8) + "</a>" * (n // 8),
}


@pytest.mark.parametrize("kind", sorted(ADVERSARIAL))
@pytest.mark.parametrize("fn", [validate_xml_prompt, looks_like_xml], ids=["validate", "looks_like_xml"])
def test_time_grows_linearly(kind, fn):
    small, large = ADVERSARIAL[kind](1_000), ADVERSARIAL[kind](100_000)
    # 1 KB repeated 100 times is the same work as 100 KB once if the linter is linear
    # (each call caught on its own: a refused input must not end the 100 calls after the first)
    t_small, t_large = _time(fn, small, calls=100), _time(fn, large, calls=1)
    # linear: ratio ~1 (the old pattern: > 1000 on the first kind). Slack for a shared machine and cache effects.
    assert t_large < 6 * max(t_small, 0.005), (kind, t_small, t_large)
    assert t_large < 2.0


def test_size_cap_refuses_before_work():
    text = "<a>" + "x" * MAX_XML_CHARS + "</a>"
    t0 = time.perf_counter()
    with pytest.raises(InputError, match=f"{MAX_XML_CHARS:,} characters"):
        validate_xml_prompt(text)
    assert time.perf_counter() - t0 < 0.1


def test_error_names_the_column_in_words_and_marks_it():
    with pytest.raises(InputError) as e:
        validate_xml_prompt("<a>x</a>\n  x </b>")
    msg = str(e.value)
    assert "line 2, column 5: " in msg and "(column 5 = the 5th character of line 2, at '<')" in msg
    # ComfyUI's error dialog collapses runs of spaces: the ▶ marker still points at the column
    collapsed = " ".join(msg.split())
    assert "here: x ▶</b>" in collapsed


def test_unfinished_tag_at_the_end_is_located():
    with pytest.raises(InputError, match=r"line 2, column 10: this '<' starts a tag that is never finished"):
        validate_xml_prompt("<a>b</a>\n<c>x</c> <d" + " " * 50)
