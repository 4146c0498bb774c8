"""Pivotal tuning: new tokens `<s0><s1>…` whose embedding vectors train alongside the LoRA.

A placeholder word in captions and prompts (`TOK`) is replaced by new tokens, and their vectors are
learned by textual inversion for the first `frac` of the steps; after the pivot only the LoRA trains.
This follows the diffusers advanced DreamBooth LoRA scripts
(examples/advanced_diffusion_training/train_dreambooth_lora_sd15_advanced.py: `--token_abstraction`,
`--num_new_tokens_per_abstraction`, `--train_text_encoder_ti_frac`).

Unlike those scripts, which train the whole token-embedding matrix and copy the old rows back after
every step, the new vectors here are their own `nn.Parameter` inside `NewTokenEmbedding`: the original
matrix never reaches an optimizer, so its rows are untouched by construction.

SDXL has two text encoders, and a token needs a vector in each: the new tokens go into both
tokenizers and both encoders (CLIP-L and OpenCLIP bigG), each with vectors of its own width, as in
diffusers' train_dreambooth_lora_sdxl_advanced.py.

The saved file is what AUTOMATIC1111 and ComfyUI load as an embedding: a safetensors file with the
single key `emb_params` holding a [vectors, dim] tensor (SD1/SD2), or for SDXL the two keys `clip_l`
and `clip_g`, one per encoder (see `save_embeddings`).
"""
from __future__ import annotations

import os
import re

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from lorabake import store
from lorabake.config import Pivotal

PARAM_KEY = "emb_params"
SDXL_KEYS = ("clip_l", "clip_g")  # the SDXL embedding file's tensors, in text-encoder order


def file_keys(count: int) -> tuple[str, ...]:
    """The embedding file's tensor names for `count` text encoders (1, or SDXL's 2)."""
    return SDXL_KEYS if count == 2 else (PARAM_KEY,)


# ---------------------------------------------------------------- names and captions

def new_token_names(cfg: Pivotal) -> list[str]:
    """The new tokens, named as the diffusers scripts name them: <s0>, <s1>, …"""
    return [f"<s{i}>" for i in range(cfg.num_new_tokens)]


def substitute(text: str, cfg: Pivotal) -> str:
    """Replace the placeholder *word* (case-sensitive, not inside other words: `TOKEN`, `myTOK` and
    `TOK_2` stay) with the new tokens written together, "<s0><s1>"."""
    replacement = "".join(new_token_names(cfg))
    return re.sub(rf"\b{re.escape(cfg.token)}\b", lambda _match: replacement, text)


# ---------------------------------------------------------------- the embedding with new rows

class NewTokenEmbedding(nn.Module):
    """A token embedding extended by `vectors` for the ids from `len(weight)` on.

    Old ids are looked up in `weight` (the original matrix, kept frozen and under its original
    state-dict name); new ids index `vectors`. The outputs for old ids are exactly the original
    embedding's, and `weight` gets no gradient.
    """

    def __init__(self, weight: nn.Parameter, vectors: nn.Parameter) -> None:
        super().__init__()
        if vectors.shape[1] != weight.shape[1]:
            raise ValueError(f"new vectors have width {vectors.shape[1]}, the embedding {weight.shape[1]}")
        self.weight = weight.requires_grad_(False)
        self.vectors = vectors
        self.first_new_id = weight.shape[0]

    @property
    def num_embeddings(self) -> int:
        return self.first_new_id + self.vectors.shape[0]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_new = input_ids >= self.first_new_id
        old = F.embedding(input_ids.masked_fill(is_new, 0), self.weight)
        new = self.vectors[(input_ids - self.first_new_id).clamp(min=0)].to(old.dtype)
        return torch.where(is_new.unsqueeze(-1), new, old)


def _register_tokens(tokenizer, vocab_size: int, cfg: Pivotal) -> list[int]:
    """Add the new tokens to the tokenizer; they must get the ids right after the embedding's rows."""
    names = new_token_names(cfg)
    tokenizer.add_tokens(names)  # already present (a second load) is fine: the ids are checked below
    ids = tokenizer.convert_tokens_to_ids(names)
    expected = list(range(vocab_size, vocab_size + len(names)))
    if ids != expected:
        raise ValueError(f"the tokenizer gave {names} the ids {ids}, but the text encoder's embedding has "
                         f"{vocab_size} rows, so they must be {expected}: the tokenizer has other added tokens")
    return ids


def _install(tokenizer, text_encoder, cfg: Pivotal, initial: torch.Tensor) -> nn.Parameter:
    """Register the tokens and put a `NewTokenEmbedding` holding `initial` into the text encoder."""
    embedding = text_encoder.get_input_embeddings()
    if isinstance(embedding, NewTokenEmbedding):
        raise ValueError("the text encoder already has pivotal-tuning tokens installed")
    _register_tokens(tokenizer, embedding.weight.shape[0], cfg)
    # The vectors stay float32 even under a half-precision text encoder: an optimizer needs the
    # precision, and forward casts them to the encoder's dtype.
    vectors = nn.Parameter(initial.to(embedding.weight.device, torch.float32).clone())
    text_encoder.set_input_embeddings(NewTokenEmbedding(embedding.weight, vectors))
    return vectors


def _initial_vectors(tokenizer, weight: torch.Tensor, cfg: Pivotal, seed: int) -> torch.Tensor:
    """The init word's (first token's) embedding in every row, else seeded normal noise scaled to
    the std of the existing rows, as the diffusers advanced scripts do without an initializer."""
    if cfg.init is not None:
        init_ids = tokenizer(cfg.init, add_special_tokens=False)["input_ids"]
        if not init_ids:
            raise ValueError(f"pivotal.init {cfg.init!r} gives no tokens")
        return weight.detach()[init_ids[0]].float().repeat(cfg.num_new_tokens, 1)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((cfg.num_new_tokens, weight.shape[1]), generator=generator)
    return noise * weight.detach().float().std()


def add_tokens(tokenizer, text_encoder, cfg: Pivotal, seed: int) -> nn.Parameter:
    """Add `<s0><s1>…` to the tokenizer and the text encoder; return their trainable vectors
    (shape [num_new_tokens, dim]). The original embedding rows are frozen and never change."""
    weight = text_encoder.get_input_embeddings().weight
    return _install(tokenizer, text_encoder, cfg, _initial_vectors(tokenizer, weight, cfg, seed))


def add_tokens_to_all(tokenizers: list, text_encoders: list, cfg: Pivotal, seed: int) -> dict[str, nn.Parameter]:
    """`add_tokens` on every (tokenizer, text encoder) pair, the k-th seeded with seed + k; the
    vectors by the file key that holds them (`emb_params`, or SDXL's `clip_l`, `clip_g`)."""
    keys = file_keys(len(text_encoders))
    return {key: add_tokens(tokenizer, encoder, cfg, seed + k)
            for k, (key, tokenizer, encoder) in enumerate(zip(keys, tokenizers, text_encoders, strict=True))}


# ---------------------------------------------------------------- the schedule

def pivot_step(total_steps: int, cfg: Pivotal) -> int:
    """The last step (1-based) on which the embeddings train: round(frac × total_steps), at least 1
    so that a pivotal run always trains its tokens, however short."""
    return max(1, round(cfg.frac * total_steps))


def is_training(step: int, total_steps: int, cfg: Pivotal) -> bool:
    """Whether the embeddings train on optimizer step `step` (1-based, as the training loop counts)."""
    return step <= pivot_step(total_steps, cfg)


def freeze_after(vectors: nn.Parameter | dict[str, nn.Parameter], step: int, total_steps: int, cfg: Pivotal) -> bool:
    """Call before step `step`'s forward pass: past the pivot, stop training the vectors (one
    parameter, or each of a dict's) and return False. Their gradient is dropped (not zeroed) because
    Adam-like optimizers skip parameters without a gradient, while a zero gradient would still move
    them by momentum and weight decay."""
    training = is_training(step, total_steps, cfg)
    for one in vectors.values() if isinstance(vectors, dict) else [vectors]:
        if not training and one.requires_grad:
            one.requires_grad_(False)
            one.grad = None
    return training


def learning_rate(cfg: Pivotal, text_encoder_lr: float) -> float:
    """pivotal.lr, else the text encoder's learning rate (optimizer.text_encoder_lr, else lr)."""
    return cfg.lr if cfg.lr is not None else text_encoder_lr


# ---------------------------------------------------------------- files

def save_embeddings(path: str | os.PathLike, vectors: torch.Tensor | dict[str, torch.Tensor], cfg: Pivotal,
                    metadata: dict[str, str]) -> None:
    """Write the vectors as an embedding file, atomically: one tensor (SD1/SD2) or a dict by file key.

    SD1/SD2: one key, `emb_params`, of shape [vectors, dim], float32. AUTOMATIC1111
    (modules/textual_inversion/textual_inversion.py, load_from_file) takes a safetensors file with a
    single tensor as a "diffusers concept" and asserts that there is exactly one key; ComfyUI
    (comfy/sd1_clip.py, load_embed) uses the `clip_l` key if present, else the first tensor.
    SDXL: `clip_l` [vectors, 768] and `clip_g` [vectors, 1280] (tiny widths on the tiny base), the keys
    AUTOMATIC1111's SDXL embeddings and ComfyUI's SDXL clip (comfy/sdxl_clip.py) read, one per encoder.
    Both use the file's name as the prompt word. Metadata is ignored by both, so it carries the token facts.
    """
    named = {PARAM_KEY: vectors} if isinstance(vectors, torch.Tensor) else vectors
    for key, tensor in named.items():
        if tensor.ndim != 2 or tensor.shape[0] != cfg.num_new_tokens:
            raise ValueError(f"{key}: expected [{cfg.num_new_tokens}, dim] vectors, got {list(tensor.shape)}")
    tensors = {key: tensor.detach().to("cpu", torch.float32).contiguous() for key, tensor in named.items()}
    facts = {"pivotal_token": cfg.token, "pivotal_tokens": "".join(new_token_names(cfg))}
    store.write_safetensors(path, tensors, {**metadata, **facts})


def _read_vectors(path: str | os.PathLike, key: str, width: int, cfg: Pivotal) -> torch.Tensor:
    tensors = load_file(os.fspath(path), device="cpu")
    if key not in tensors:
        raise ValueError(f"{path}: no '{key}' tensor (keys: {sorted(tensors)})")
    vectors = tensors[key]
    if tuple(vectors.shape) != (cfg.num_new_tokens, width):
        raise ValueError(f"{path}: '{key}' has shape {list(vectors.shape)}, but pivotal.num_new_tokens "
                         f"is {cfg.num_new_tokens} and the text encoder's width {width}")
    return vectors


def load_embeddings(path: str | os.PathLike, tokenizer, text_encoder, cfg: Pivotal) -> None:
    """Install saved vectors for `<s0><s1>…` (frozen), so prompts passed through `substitute` use
    them. A text encoder that already has the tokens (the one just trained) gets its vectors replaced.
    SDXL: lists of both tokenizers and both encoders, which read `clip_l` and `clip_g`."""
    tokenizers = tokenizer if isinstance(tokenizer, (list, tuple)) else [tokenizer]
    encoders = text_encoder if isinstance(text_encoder, (list, tuple)) else [text_encoder]
    for key, one_tokenizer, encoder in zip(file_keys(len(encoders)), tokenizers, encoders, strict=True):
        _load_one(path, key, one_tokenizer, encoder, cfg)


def _load_one(path: str | os.PathLike, key: str, tokenizer, text_encoder, cfg: Pivotal) -> None:
    embedding = text_encoder.get_input_embeddings()
    vectors = _read_vectors(path, key, embedding.weight.shape[1], cfg)
    if isinstance(embedding, NewTokenEmbedding):
        _register_tokens(tokenizer, embedding.first_new_id, cfg)
        if embedding.vectors.shape != vectors.shape:
            raise ValueError(f"{path}: {vectors.shape[0]} vectors, the text encoder has {embedding.vectors.shape[0]}")
        with torch.no_grad():
            embedding.vectors.copy_(vectors)
        embedding.vectors.requires_grad_(False)
        return
    _install(tokenizer, text_encoder, cfg, vectors).requires_grad_(False)
