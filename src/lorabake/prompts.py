"""kohya's sample-prompt syntax, parsed without torch.

A prompt line reads `a red circle --n blurry --w 128 --h 128 --d 7 --l 7.5 --s 20` (negative prompt,
width, height, seed, CFG scale, steps). The config check (`lorabake.project_file.Samples`) and the sampler
(`lorabake.render.sample`) both parse with this, so a prompt the config accepted is one the sampler
reads.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

OPTION = re.compile(r"^(?P<key>[a-z])\s+(?P<value>.*)$", re.S)


@dataclass(frozen=True)
class Prompt:
    text: str
    negative: str
    width: int
    height: int
    seed: int
    cfg: float
    steps: int


FIELDS = {"n": ("negative", str), "w": ("width", int), "h": ("height", int), "d": ("seed", int),
          "l": ("cfg", float), "s": ("steps", int)}
# Long names people write from other tools' habits, and kohya's one letter for each
LONG_NAMES = {"negative": "n", "neg": "n", "width": "w", "height": "h", "seed": "d", "cfg": "l", "scale": "l",
              "steps": "s"}


def _unknown_option(line: str, option: str) -> str:
    word = option.split()[0] if option.split() else option
    hint = f"; kohya's name for it is --{LONG_NAMES[word.lower()]}" if word.lower() in LONG_NAMES else ""
    return f"sample prompt {line!r}: unknown option '--{option}' (known: --n --w --h --d --l --s){hint}"


def parse_prompt(line: str, defaults: Prompt) -> Prompt:
    """kohya's sample-prompt syntax; an option we do not know is an error, not a silent no-op."""
    text, *options = line.split(" --")
    prompt = replace(defaults, text=text.strip())
    for option in options:
        match = OPTION.match(option.strip())
        if not match or match["key"] not in FIELDS:
            raise ValueError(_unknown_option(line, option.strip()))
        name, kind = FIELDS[match["key"]]
        try:
            prompt = replace(prompt, **{name: kind(match["value"].strip())})
        except ValueError:
            raise ValueError(f"sample prompt {line!r}: --{match['key']} needs a {kind.__name__}, got {match['value']!r}") from None
    if prompt.width % 8 or prompt.height % 8:
        raise ValueError(f"sample prompt {line!r}: width and height must be multiples of 8")
    return prompt

