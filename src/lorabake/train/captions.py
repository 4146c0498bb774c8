"""Captions as kohya sd-scripts treats them: per-step processing, A1111 emphasis, and text encoding.

`process_caption` is kohya's `BaseDataset.process_caption` (library/train_util.py): caption dropout,
then the tags after the first `keep_tokens` shuffled and dropped one by one. `parse_weighted` reads
A1111's emphasis syntax, `(tag)`, `[tag]`, `(tag:1.3)`. `encode_captions` gives the hidden states the
UNet attends to, with kohya's long-prompt scheme: the caption's tokens are cut into windows of 75,
each window is encoded as BOS + 75 tokens + EOS, and the windows' states are joined back into one
sequence of max_token_length + 2 (kohya's `get_input_ids` + `get_hidden_states`, now
`SdTokenizeStrategy` / `SdTextEncodingStrategy` in library/strategy_sd.py).

Where this differs from kohya on purpose:
- empty tags (`a,, b,`) are dropped when tags are split, and tags are joined with the configured
  separator plus a space (kohya drops nothing and always joins with ", ");
- weighted captions keep the mean of the states, as kohya did before its 2024 strategy refactor
  (`get_weighted_text_embeddings`, from lpw_stable_diffusion); kohya now multiplies by the weights
  without rescaling, and so does this module where the mean is ~0 and cannot be kept (see
  `apply_token_weights`). The layout is kohya's current one either way: max_token_length + 2
  positions (its old weighted path kept every window's BOS/EOS, 77 per window).
"""
from __future__ import annotations

import random
import re

import torch

from lorabake.config import Captions

# ---------------------------------------------------------------- per-step caption processing


def process_caption(caption: str, cfg: Captions, rng: random.Random, epoch: int) -> str:
    """The caption one training step sees, in kohya's order; `epoch` counts from 1.

    The caption comes back as the same string when nothing applies, so a run with these options off
    draws nothing from `rng` and sees its captions untouched."""
    if _dropped(cfg, rng, epoch):
        return ""
    if not (cfg.shuffle or cfg.tag_dropout_rate > 0):
        return caption
    tags = [tag for tag in (raw.strip() for raw in caption.split(cfg.separator)) if tag]
    fixed, flexible = tags[: cfg.keep_tokens], tags[cfg.keep_tokens :]
    if cfg.shuffle:
        rng.shuffle(flexible)
    if cfg.tag_dropout_rate > 0:
        flexible = [tag for tag in flexible if rng.random() >= cfg.tag_dropout_rate]
    return f"{cfg.separator} ".join(fixed + flexible)


def _dropped(cfg: Captions, rng: random.Random, epoch: int) -> bool:
    # kohya draws for dropout_rate before looking at the epoch, so the random stream does not
    # depend on which epochs are dropped.
    by_rate = cfg.dropout_rate > 0 and rng.random() < cfg.dropout_rate
    by_epoch = cfg.dropout_every_n_epochs > 0 and epoch % cfg.dropout_every_n_epochs == 0
    return by_rate or by_epoch


# ---------------------------------------------------------------- A1111 emphasis

ROUND_EMPHASIS = 1.1        # (tag): × 1.1, [tag]: ÷ 1.1 (A1111 modules/prompt_parser.py)

# One token of the emphasis syntax. A backslash makes the next bracket or backslash literal (and a
# lone backslash vanishes, as in A1111); `:1.3)` closes a round bracket with an explicit weight.
# The number is stricter than A1111's `[.\d]+`, so `(x:1.2.3)` reads as text instead of raising.
EMPHASIS_TOKEN = re.compile(r"""
    (?P<escaped>\\[()\[\]\\]?)
  | (?P<open>[(\[])
  | :\s*(?P<weight>[+-]?(?:\d+\.?\d*|\.\d+))\s*\)
  | (?P<close>[)\]])
  | [^\\()\[\]:]+
  | :
""", re.VERBOSE)


def parse_weighted(text: str) -> list[tuple[str, float]]:
    """Split `text` into (fragment, weight) by A1111's emphasis rules.

    Nested brackets multiply; a closing bracket with no opener is literal text; brackets still open
    at the end apply to everything after them; neighbouring fragments of equal weight are merged.
    >>> parse_weighted("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]"""
    fragments: list[list] = []
    open_round: list[int] = []      # index of the first fragment inside each open bracket
    open_square: list[int] = []
    for match in EMPHASIS_TOKEN.finditer(text):
        token = match.group()
        if match["escaped"] is not None:
            fragments.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(fragments))
        elif token == "[":
            open_square.append(len(fragments))
        elif match["weight"] is not None and open_round:
            _scale_from(fragments, open_round.pop(), float(match["weight"]))
        elif token == ")" and open_round:
            _scale_from(fragments, open_round.pop(), ROUND_EMPHASIS)
        elif token == "]" and open_square:
            _scale_from(fragments, open_square.pop(), 1 / ROUND_EMPHASIS)
        else:
            fragments.append([token, 1.0])
    for start in open_round:
        _scale_from(fragments, start, ROUND_EMPHASIS)
    for start in open_square:
        _scale_from(fragments, start, 1 / ROUND_EMPHASIS)
    return _merge_equal_neighbours(fragments) or [("", 1.0)]


def _scale_from(fragments: list[list], start: int, factor: float) -> None:
    for fragment in fragments[start:]:
        fragment[1] *= factor


def _merge_equal_neighbours(fragments: list[list]) -> list[tuple[str, float]]:
    merged: list[tuple[str, float]] = []
    for text, weight in fragments:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + text, weight)
        else:
            merged.append((text, weight))
    return merged


# ---------------------------------------------------------------- text encoding

NEGLIGIBLE_MEAN = 1e-3      # a caption's mean state below this × its mean |state| is not rescaled


def encode_captions(tokenizer, text_encoder, captions: list[str], *, max_token_length: int = 75,
                    clip_skip: int = 1, weighted: bool = False) -> torch.Tensor:
    """CLIP hidden states for a batch of captions, [B, max_token_length + 2, D].

    Gradients flow when the caller enables them (a trained text encoder); the ids go to the text
    encoder's device and the states keep its dtype. With max_token_length 75 this is exactly the
    plain 77-token encoding SD1 was trained with."""
    ids, weights = caption_windows(tokenizer, text_encoder, captions, max_token_length, weighted)
    states = encode_windows(text_encoder, ids.flatten(0, 1), clip_skip)     # [B × windows, 77, D]
    return weigh(join_windows(states.unflatten(0, ids.shape[:2])), weights)


def encode_sdxl(tokenizers: list, text_encoders: list, captions: list[str], *, max_token_length: int = 75,
                weighted: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's conditioning: both encoders' penultimate states, without the final layer norm, side by
    side per position ([B, max_token_length + 2, D1 + D2]), and the second encoder's projected EOS
    state of each caption's first window ([B, P]) — kohya's `get_hidden_states_sdxl`, diffusers'
    `encode_prompt`."""
    hidden, pooled = [], None
    for tokenizer, text_encoder in zip(tokenizers, text_encoders):
        ids, weights = caption_windows(tokenizer, text_encoder, captions, max_token_length, weighted)
        output = text_encoder(ids.flatten(0, 1), output_hidden_states=True, return_dict=True)
        states = output.hidden_states[-2].unflatten(0, ids.shape[:2])
        hidden.append(weigh(join_windows(states), weights))
        if hasattr(output, "text_embeds"):
            pooled = output.text_embeds.unflatten(0, ids.shape[:2])[:, 0]
    return torch.cat(hidden, dim=-1), pooled


def caption_windows(tokenizer, text_encoder, captions: list[str], max_token_length: int,
                    weighted: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids of every caption's 77-token windows ([B, windows, 77], on the encoder's device) and,
    for weighted captions, a weight per joined position."""
    window = tokenizer.model_max_length - 2
    if max_token_length % window:
        raise ValueError(f"max_token_length must be a multiple of {window}, got {max_token_length}")
    tokens = [caption_tokens(tokenizer, caption, max_token_length, weighted) for caption in captions]
    windows = [window_ids(tokenizer, ids, max_token_length) for ids, _ in tokens]
    device = next(text_encoder.parameters()).device
    ids = torch.tensor(windows, dtype=torch.long, device=device)
    if not weighted:
        return ids, None
    weights = [[1.0, *(w + [1.0] * max_token_length)[:max_token_length], 1.0] for _, w in tokens]
    return ids, torch.tensor(weights, device=device)


def weigh(hidden: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return hidden if weights is None else apply_token_weights(hidden, weights)


def caption_tokens(tokenizer, caption: str, max_token_length: int,
                   weighted: bool) -> tuple[list[int], list[float]]:
    """The caption's token ids without BOS/EOS, cut at max_token_length, and a weight per token.

    Weighted fragments are tokenized one by one, as A1111 and kohya do; unweighted, the whole caption
    is one fragment and its brackets are ordinary text."""
    fragments = parse_weighted(caption) if weighted else [(caption, 1.0)]
    ids: list[int] = []
    weights: list[float] = []
    for text, weight in fragments:
        fragment_ids = tokenizer(text, add_special_tokens=False, truncation=True,
                                 max_length=max_token_length).input_ids
        ids += fragment_ids
        weights += [weight] * len(fragment_ids)
        if len(ids) >= max_token_length:
            break
    return ids[:max_token_length], weights[:max_token_length]


def window_ids(tokenizer, text_ids: list[int], max_token_length: int) -> list[list[int]]:
    """kohya's windows of one caption: BOS + 75 ids + EOS each, the ids being the caption, its EOS
    and padding. SD1 pads with EOS. For a tokenizer with a separate pad (SD2) kohya ends a window
    with EOS only where text runs up to its end, and opens a window past the caption with EOS."""
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    window = tokenizer.model_max_length - 2
    body = (text_ids + [eos] + [pad] * max_token_length)[:max_token_length]
    windows = []
    for start in range(0, max_token_length, window):
        middle = body[start : start + window]
        if middle[0] == pad:
            middle[0] = eos
        end = pad if middle[-1] in (eos, pad) else eos
        windows.append([bos, *middle, end])
    return windows


def encode_windows(text_encoder, ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
    """States of each 77-token window: the last layer, or with clip_skip n the n-th last layer put
    through the final layer norm, as kohya does for SD1 (`hidden_states[-n]`)."""
    if clip_skip == 1:
        return text_encoder(ids)[0]    # last_hidden_state: final_layer_norm(hidden_states[-1])
    layers = text_encoder.config.num_hidden_layers
    if clip_skip > layers:
        raise ValueError(f"clip_skip {clip_skip} is more than the text encoder's {layers} layers")
    output = text_encoder(ids, output_hidden_states=True, return_dict=True)
    # transformers 5 dropped the `text_model` level of CLIPTextModel; 4.x still has it.
    final_layer_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
    return final_layer_norm(output.hidden_states[-clip_skip])


def join_windows(states: torch.Tensor) -> torch.Tensor:
    """[B, windows, 77, D] → [B, windows × 75 + 2, D]: the first window's BOS state, the 75 inner
    states of every window, the last window's final (EOS) state (kohya's `get_hidden_states`)."""
    batch, _, _, width = states.shape
    inner = states[:, :, 1:-1].reshape(batch, -1, width)
    return torch.cat([states[:, 0, :1], inner, states[:, -1, -1:]], dim=1)


def apply_token_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Multiply each position's state by its weight, then rescale each caption's states so their
    mean is what it was (lpw_stable_diffusion's `get_weighted_text_embeddings`, which kohya used
    until 2024). Done in float32, so bf16 states lose nothing to the rescale.

    The rescale divides one mean by another. States whose mean is ~0 next to their magnitude (a
    final layer norm with zero bias, as in untrained tiny-sd) would make that noise over noise, or
    0/0; such captions keep the plain product, which is what kohya does now."""
    states = hidden.float()
    weighted = states * weights.float().unsqueeze(-1)
    previous_mean = states.mean(dim=(-2, -1), keepdim=True)
    current_mean = weighted.mean(dim=(-2, -1), keepdim=True)
    magnitude = states.abs().mean(dim=(-2, -1), keepdim=True)
    usable = torch.minimum(previous_mean.abs(), current_mean.abs()) > NEGLIGIBLE_MEAN * magnitude
    # A safe divisor where unusable, so the unused branch of `where` cannot put NaN in the gradients.
    divisor = torch.where(usable, current_mean, torch.ones_like(current_mean))
    rescale = torch.where(usable, previous_mean / divisor, torch.ones_like(current_mean))
    return (weighted * rescale).to(hidden.dtype)
