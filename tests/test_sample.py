import pytest

from lorabake.sample import Prompt, parse_prompt

DEFAULTS = Prompt("", "", 128, 128, 42, 7.5, 20)


def test_kohya_prompt_syntax():
    p = parse_prompt("lbk, red circle --n blurry, lowres --w 192 --h 64 --d 7 --l 5.5 --s 12", DEFAULTS)
    assert p == Prompt("lbk, red circle", "blurry, lowres", 192, 64, 7, 5.5, 12)


def test_defaults_fill_missing_options():
    assert parse_prompt("just a prompt", DEFAULTS) == Prompt("just a prompt", "", 128, 128, 42, 7.5, 20)


def test_unknown_or_bad_options_are_errors():
    with pytest.raises(ValueError, match="unknown option"):
        parse_prompt("x --q 3", DEFAULTS)
    with pytest.raises(ValueError, match="--w needs a int"):
        parse_prompt("x --w wide", DEFAULTS)
    with pytest.raises(ValueError, match="multiples of 8"):
        parse_prompt("x --w 100", DEFAULTS)
