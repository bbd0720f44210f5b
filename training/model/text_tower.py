"""CLIP text tower: causal pre-LayerNorm transformer pooled at the end-of-text token.

Why batches may be padded only to their longest caption (dynamic text length): attention is
causal, so a position never sees what comes after it, and the output is read at the first EOT.
Everything after EOT, padding included, therefore cannot change the result, and a batch of
short captions runs on a short sequence instead of the full context length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from training.model.configs import TextConfig


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        # Same switch name as timm's Attention, so CLIP.set_fused_attention sets both towers.
        self.fused_attn = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        # (B, L, 3W) -> 3 x (B, heads, L, W / heads)
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        if self.fused_attn:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
            future = torch.ones(length, length, dtype=torch.bool, device=x.device).triu_(1)
            y = scores.masked_fill(future, float("-inf")).softmax(dim=-1) @ v
        return self.out(y.transpose(1, 2).reshape(batch, length, width))


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the sigmoid approximation of GELU that OpenAI trained CLIP with.
    Close to GELU but not equal (up to ~0.02 apart), so OpenAI's weights need it to reproduce
    their embeddings."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def _activation(name: str) -> nn.Module:
    return QuickGELU() if name == "quick_gelu" else nn.GELU()


class ResidualBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, activation: str = "gelu") -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), _activation(activation), nn.Linear(hidden, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TextTower(nn.Module):
    def __init__(self, cfg: TextConfig, embed_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.grad_checkpointing = False
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.blocks = nn.ModuleList(
            ResidualBlock(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.activation)
            for _ in range(cfg.layers)
        )
        self.ln_final = nn.LayerNorm(cfg.width)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        # CLIP's initialisation (Radford et al. 2021), as OpenAI's code and OpenCLIP do it: small
        # embeddings, projections into the residual stream scaled down with depth so the stream's
        # variance stays O(1); attention biases zero (nn.MultiheadAttention's), MLP biases at
        # nn.Linear's default U(+-1/sqrt(fan_in)), which their init leaves untouched.
        width, layers = self.cfg.width, self.cfg.layers
        attn_std = width**-0.5
        residual_std = attn_std * (2 * layers) ** -0.5
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=attn_std)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.normal_(block.attn.out.weight, std=residual_std)
            nn.init.zeros_(block.attn.out.bias)
            nn.init.normal_(block.mlp[0].weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp[2].weight, std=residual_std)
        nn.init.normal_(self.proj.weight, std=width**-0.5)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids, L <= context_length, each row holding an EOT -> (B, embed_dim)."""
        length = text.shape[1]
        if length > self.cfg.context_length:
            raise ValueError(
                f"text length {length} exceeds context_length {self.cfg.context_length}"
            )
        x = self.token_embedding(text) + self.positional_embedding[:length]
        checkpointing = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if checkpointing else block(x)
        x = self.ln_final(x)
        # First EOT per row (argmax returns the first maximum). A row without EOT would pool
        # position 0; the tokenizer never produces one (truncation keeps EOT).
        eot_positions = (text == self.cfg.eot_id).int().argmax(dim=-1)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot_positions]
        return self.proj(pooled)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return {"token_embedding.weight", "positional_embedding"}
