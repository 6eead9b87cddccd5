"""Small models shared by the quantize_ and reload batteries."""

from __future__ import annotations

import torch
from torch import nn


class Net(nn.Module):
    """Embedding, five linears, a norm and a buffer: enough for 'fails at the 3rd of 5 layers'."""

    def __init__(self, dim: int = 64, n: int = 5):
        super().__init__()
        self.embed = nn.Embedding(16, dim)
        self.layers = nn.ModuleList(nn.Linear(dim, dim, bias=i % 2 == 0) for i in range(n))
        self.norm = nn.LayerNorm(dim)
        self.register_buffer("pos", torch.arange(4, dtype=torch.float32))

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


def net(seed: int = 0, dtype=torch.bfloat16) -> Net:
    torch.manual_seed(seed)
    return Net().to(dtype)


class FakeDevice(torch.Tensor):
    """A CPU tensor that says it lives on cuda:1 (there is no GPU here to put one on)."""

    @property
    def device(self):
        return torch.device("cuda", 1)
