"""Tiny versions of the models people train today, and a LightningModule that trains any of them."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

VOCAB, WIDTH, LENGTH = 50, 32, 12


def tiny_gpt2(layers: int = 2, tied: bool = True) -> nn.Module:
    """Hugging Face's GPT-2 (projections are ``Conv1D``, ``lm_head`` tied to ``wte``), 4 heads of 8."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=layers, n_embd=WIDTH, n_head=4, n_positions=LENGTH, vocab_size=VOCAB, tie_word_embeddings=tied,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def tiny_llama(layers: int = 2) -> nn.Module:
    """Hugging Face's Llama: untied, RMSNorm, SwiGLU, grouped-query attention (4 query heads, 2 key-value heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        num_hidden_layers=layers, hidden_size=WIDTH, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=LENGTH, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def torch_encoder(layers: int = 2) -> nn.Module:
    """PyTorch's own ``nn.TransformerEncoder`` (q, k, v in ``in_proj_weight``), with an embedding and a head."""
    layer = nn.TransformerEncoderLayer(WIDTH, 4, 64, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
    return nn.ModuleDict({"embed": nn.Embedding(VOCAB, WIDTH), "encoder": encoder, "head": nn.Linear(WIDTH, VOCAB)})


class LanguageModel(LightningModule):
    """Next-token prediction with any of the models above (Hugging Face models take ``input_ids``)."""

    def __init__(self, model: nn.Module, lr: float = 1e-2, optimizer: str = "adam") -> None:
        super().__init__()
        self.model, self.lr, self.optimizer = model, lr, optimizer

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if isinstance(self.model, nn.ModuleDict):
            return self.model["head"](self.model["encoder"](self.model["embed"](tokens)))
        return self.model(input_ids=tokens).logits

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (tokens,) = batch
        logits = self(tokens)[:, :-1]
        return nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=0.9)
        return torch.optim.Adam(params, lr=self.lr)


def token_data(n: int = 32, batch_size: int = 8, seed: int = 0) -> DataLoader:
    """Sequences with structure to learn: each token is the previous one plus one (mod the vocabulary)."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=generator)
    tokens = (start + torch.arange(LENGTH)) % VOCAB
    return DataLoader(TensorDataset(tokens), batch_size=batch_size)


class Regression(LightningModule):
    """Least squares through ``net``, full batch, plain SGD: deterministic, for comparing two layouts of one model."""

    def __init__(self, net: nn.Module, lr: float = 0.05) -> None:
        super().__init__()
        self.net, self.lr = net, lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return (self.net(x) - y).pow(2).sum(dim=1).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)
