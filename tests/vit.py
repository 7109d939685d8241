"""timm's ViT layout, written out (timm needs torchvision, which does not import beside this machine's CPU torch):
``Attention`` with a fused ``qkv`` reshaped to ``(B, N, 3, num_heads, head_dim)`` and ``attn_dim`` read in ``forward``,
``Mlp`` with ``fc1``/``fc2``, and timm's module names (``blocks.0.attn.qkv``, ``blocks.0.mlp.fc1``)."""

import torch
from torch import nn


class Attention(nn.Module):
    """timm's ``Attention`` (``timm.layers.attention``), without the options the tests do not use."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.attn_dim = num_heads * self.head_dim
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=True)
        self.norm = nn.Identity()
        self.proj = nn.Linear(self.attn_dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = nn.functional.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj(self.norm(x))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, num_heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """timm's ``VisionTransformer`` layout: ``patch_embed``, ``cls_token``, ``pos_embed``, ``blocks``, ``head``."""

    def __init__(self, image=28, patch=7, channels=1, dim=64, depth=2, num_heads=4, hidden=128, classes=10) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(patch, channels, dim)
        tokens = (image // patch) ** 2 + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, num_heads, hidden) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])
