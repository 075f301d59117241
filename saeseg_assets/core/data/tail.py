"""The backbone's tail: the blocks after the SAE's layer and the final norm, run on recorded (and edited) layer-L
tokens, so that an edit at layer L reaches the final patch tokens as the ViT's own forward pass would carry it."""

from __future__ import annotations

import torch
from torch import nn

from .backbone import Backbone

FORMAT_VERSION = 1  # of what the tail computes: blocks L+1.. and the final norm, on prefix + patch tokens
BLOCK_IMAGES = 16  # images per tail forward


class BackboneTail(nn.Module):
    """Blocks `layer + 1` to the end and the final norm of one backbone, on `device`. Prefix tokens (CLS, registers)
    go in beside the patch tokens, since attention mixes them; only the final patch tokens come out."""

    def __init__(self, blocks: list[nn.Module], final_norm: nn.Module, n_prefix_tokens: int,
                 device: torch.device | str = "cpu"):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.final_norm = final_norm
        self.n_prefix_tokens = n_prefix_tokens
        self.device = torch.device(device)
        self.eval().requires_grad_(False).to(self.device)

    @classmethod
    def of(cls, backbone: Backbone, layer: int) -> BackboneTail:
        """The tail of `backbone` after block `layer` (as the recording's `layer` attribute gives it)."""
        last = backbone.resolve_layer(layer)
        return cls(list(backbone.blocks[last + 1:]), backbone.final_norm, backbone.info.n_prefix_tokens,
                   backbone.device)

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @torch.no_grad()
    def forward(self, prefix_BRD: torch.Tensor, patch_BPD: torch.Tensor) -> torch.Tensor:
        """Final patch tokens [B, P, D] (float32, on the tail's device) of one block of images."""
        if prefix_BRD.shape[1] != self.n_prefix_tokens:
            raise ValueError(f"the tail expects {self.n_prefix_tokens} prefix tokens (CLS and registers) per image, "
                             f"got {prefix_BRD.shape[1]}")
        tokens_BTD = torch.cat([prefix_BRD, patch_BPD], 1).to(self.device, torch.float32)
        for block in self.blocks:
            tokens_BTD = block(tokens_BTD, None)
        return self.final_norm(tokens_BTD)[:, self.n_prefix_tokens:]

    def final_tokens(self, prefix_BRD: torch.Tensor, patch_BPD: torch.Tensor,
                     block_images: int = BLOCK_IMAGES) -> torch.Tensor:
        """Final patch tokens of any number of images, `block_images` per forward, on the CPU: [B, P, D]."""
        parts = [self(prefix_BRD[a:a + block_images], patch_BPD[a:a + block_images]).cpu()
                 for a in range(0, len(patch_BPD), block_images)]
        return torch.cat(parts) if parts else torch.zeros(patch_BPD.shape)

