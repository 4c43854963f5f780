"""A small GPT-style character (byte) model: token and position embeddings, causal self-attention through one
fused qkv Linear, GELU MLP, LayerNorm, a Linear head to 256 byte logits. Input (B, T) byte ids, output
(B, T, 256) logits; the quantizable layers are the Linear ones (qkv, proj, fc1, fc2 of every block, head)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hawq.models import register_model

VOCAB = 256  # bytes


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, h: Tensor) -> Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).split(d, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads)
        mask = torch.ones(t, t, dtype=torch.bool, device=h.device).triu(1)
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        h = h + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return h + self.fc2(F.gelu(self.fc1(self.ln2(h))))


class CharGPT(nn.Module):
    def __init__(self, context: int = 64, d: int = 96, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.context = context
        self.tok, self.pos = nn.Embedding(VOCAB, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"sequences of {t} tokens are longer than the model's context of {self.context}")
        h = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h))


@register_model
def char_gpt(context: int = 64, d: int = 96, layers: int = 2, heads: int = 4, **_) -> CharGPT:
    """The language-model task's default model (about 0.25M parameters)."""
    return CharGPT(context, d, layers, heads)
