"""The toy-shapes concept scorer: how sure a small CNN is that an image shows a concept word.

`score(image, "star")` is the probability that the image shows a star; `score(image, "red")` that its
shape is red; `score(image, "blue background")` that it stands on blue. The scorer was trained (by
scripts/pretrain_toy_shapes.py) on freshly generated images of the toy world, stars and hearts
included, so it can say how much a LoRA taught the base a shape the base never saw.
`prompt_accuracy` samples a built base on the world's prompts and counts how often the scorer finds
the prompted shape and colour.
"""
from __future__ import annotations

import functools
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from lorabake.models import bases, toy_world

HEADS = {"shape": toy_world.SHAPES, "colour": tuple(toy_world.COLOURS), "background": tuple(toy_world.BACKGROUNDS)}
WEIGHTS = "scorer.safetensors"


class ConceptScorer(nn.Module):
    """Four conv layers (64 → 8 px), global average + max pooling, one linear head per attribute."""

    def __init__(self, width: int = 32):
        super().__init__()
        layers, channels = [], 3
        for out in (width, 2 * width, 2 * width, 4 * width):
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.ReLU()]
            channels = out
            if out != 4 * width:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({name: nn.Linear(2 * channels, len(classes)) for name, classes in HEADS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images: (n, 3, 64, 64) in [0, 1] → logits per head."""
        features = self.features(images * 2 - 1)
        pooled = torch.cat([features.mean((2, 3)), features.amax((2, 3))], dim=1)
        return {name: head(pooled) for name, head in self.heads.items()}


def to_tensor(images: list[Image.Image] | np.ndarray) -> torch.Tensor:
    """PIL images (resized to the world's size) or a uint8 array (n, h, w, 3) → (n, 3, h, w) in [0, 1]."""
    if not isinstance(images, np.ndarray):
        size = (toy_world.SIZE, toy_world.SIZE)
        images = np.stack([np.asarray(image.convert("RGB").resize(size, Image.Resampling.BILINEAR)) for image in images])
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255


@functools.lru_cache(maxsize=1)
def load_scorer() -> ConceptScorer:
    """The shipped scorer (its sha256 checked against the toy-shapes manifest)."""
    from safetensors.torch import load_file

    model = ConceptScorer()
    model.load_state_dict({k: v.float() for k, v in load_file(bases.shipped_file(WEIGHTS)).items()})
    return model.eval().requires_grad_(False)


def concept_head(concept: str) -> tuple[str, int]:
    """"star" → ("shape", 4); "red" → ("colour", 0); "blue background" → ("background", 3)."""
    words = concept.lower().split()
    if len(words) == 2 and words[1] == "background" and words[0] in HEADS["background"]:
        return "background", HEADS["background"].index(words[0])
    for head in ("shape", "colour"):
        if len(words) == 1 and words[0] in HEADS[head]:
            return head, HEADS[head].index(words[0])
    raise ValueError(f"unknown concept {concept!r}; the scorer knows {', '.join(toy_world.concept_words())}")


def probabilities(images, scorer: ConceptScorer | None = None) -> dict[str, torch.Tensor]:
    """Per head, (n, classes) probabilities for a list of PIL images or a uint8 array."""
    scorer = scorer or load_scorer()
    with torch.no_grad():
        return {name: logits.softmax(-1) for name, logits in scorer(to_tensor(images)).items()}


def score(image: Image.Image, concept: str) -> float:
    """The probability, 0..1, that `image` shows `concept` (a shape, a shape colour or "X background")."""
    return scores([image], concept)[0]


def scores(images, concept: str) -> list[float]:
    """`score` of each image (PIL images or a uint8 array), in batches."""
    head, index = concept_head(concept)
    found = []
    for start in range(0, len(images), 64):
        found += probabilities(images[start:start + 64])[head][:, index].tolist()
    return found


def predict(images, scorer: ConceptScorer | None = None) -> list[dict[str, str]]:
    """The most likely shape, colour and background of each image."""
    found = {name: p.argmax(-1).tolist() for name, p in probabilities(images, scorer).items()}
    return [{name: HEADS[name][found[name][i]] for name in HEADS} for i in range(len(images))]


# ---------------------------------------------------------------- how well a base draws the world

def sample_prompts(base_dir: Path, prompts: list[str], steps: int = 20, cfg: float = 7.5, sampler: str = "ddim",
                   seed: int = 0, batch: int = 16) -> list[Image.Image]:
    """One image per prompt at the base's resolution; prompt i uses seed `seed + i`."""
    from lorabake.render.cells import load_pipeline

    pipe = load_pipeline(Path(base_dir), sampler)
    images = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images += pipe(chunk, num_inference_steps=steps, guidance_scale=cfg, generator=generators).images
    return images


def prompt_accuracy(base_dir: Path, steps: int = 20, cfg: float = 7.5, sampler: str = "ddim", seed: int = 0,
                    shapes: tuple[str, ...] = toy_world.BASE_SHAPES) -> tuple[dict, list[Image.Image]]:
    """Sample every prompt of the world (its (shape, colour, background) combinations) once and
    count the images in which the scorer finds the prompted shape and colour. Returns the report
    and the images (in `toy_world.combinations(shapes)` order)."""
    combos = toy_world.combinations(shapes)
    images = sample_prompts(base_dir, [toy_world.caption(*c) for c in combos], steps, cfg, sampler, seed)
    found = predict(images)
    hits = defaultdict(lambda: defaultdict(list))  # attribute → prompted value → [hit, ...]
    for (shape, colour, background), seen in zip(combos, found):
        for name, wanted in (("shape", shape), ("colour", colour), ("background", background)):
            hits[name][wanted].append(seen[name] == wanted)
        hits["both"]["all"].append(seen["shape"] == shape and seen["colour"] == colour)
    mean = lambda values: round(float(np.mean(values)), 4)  # noqa: E731
    report = {
        "prompt_accuracy": mean(hits["both"]["all"]),
        **{f"{name}_accuracy": mean([h for values in hits[name].values() for h in values]) for name in HEADS},
        **{f"per_{name}": {value: mean(h) for value, h in hits[name].items()} for name in HEADS},
        "settings": {"prompts": len(combos), "steps": steps, "cfg": cfg, "sampler": sampler, "seed": seed,
                     "size": toy_world.SIZE},
        "samples": [{"prompt": toy_world.caption(*c), **seen} for c, seen in zip(combos, found)],
    }
    return report, images
