"""Text-encoder outputs cached on disk, content-addressed and shared by every run on a base (kohya's
`--cache_text_encoder_outputs_to_disk`): with `training.cache_text_encoder_outputs`, a caption a
frozen encoder has encoded once, in any run, is read back instead of encoded again.

One safetensors file per caption under `results/cache/text/{base id}/`, named by the digest of what
decides the encoders' output: the base (its content id names the encoders), the architecture, clip
skip, token length, weighted-caption parsing, the mixed precision and device type it was computed
under, and the caption text. So a run only ever reads outputs its own encoders would have computed,
bit for bit, and a tag edit re-encodes only the captions it changed. Files hold `hidden` (and SDXL's
`pooled`), written atomically; a file that cannot be read is encoded again and rewritten.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lorabake import paths, store

Outputs = tuple[torch.Tensor, torch.Tensor | None]  # hidden states, SDXL's pooled embedding


@dataclass
class TextCache:
    folder: Path
    identity: dict  # everything but the caption that decides the outputs
    encoded: int = 0
    reused: int = 0
    memory: dict[str, Outputs] = field(default_factory=dict)

    @classmethod
    def for_run(cls, root: Path, base_id: str, arch: str, training, weighted: bool, device: str) -> "TextCache":
        identity = {"base": base_id, "arch": arch, "clip_skip": training.clip_skip,
                    "max_token_length": training.max_token_length, "weighted": weighted,
                    "precision": training.mixed_precision, "device": device}
        return cls(Path(root) / paths.text_cache(base_id), identity)

    def path(self, caption: str) -> Path:
        key = store.digest({**self.identity, "caption": caption}, length=32)
        return self.folder / key[:2] / f"{key}.safetensors"

    def read(self, caption: str) -> Outputs | None:
        """The caption's outputs from memory or disk, or None when no run has encoded it yet."""
        if caption in self.memory:
            return self.memory[caption]
        try:
            tensors = load_file(self.path(caption), device="cpu")
        except (FileNotFoundError, SafetensorError, OSError):
            return None
        self.reused += 1
        self.memory[caption] = (tensors["hidden"], tensors.get("pooled"))
        return self.memory[caption]

    def write(self, caption: str, hidden: torch.Tensor, pooled: torch.Tensor | None) -> None:
        self.encoded += 1
        hidden, pooled = hidden.detach(), None if pooled is None else pooled.detach()
        self.memory[caption] = (hidden, pooled)
        tensors = {"hidden": hidden.cpu().contiguous()} | ({} if pooled is None else {"pooled": pooled.cpu().contiguous()})
        store.write_safetensors(self.path(caption), tensors, {"caption": caption})

    def summary(self) -> str:
        return f"text-encoder outputs: encoded {self.encoded}, reused {self.reused} (cache {self.folder})"
