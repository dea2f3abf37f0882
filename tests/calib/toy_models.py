"""Small chained models for calibration tests: each block's output is the next block's input."""
import torch
from torch import nn


class Block(nn.Module):
    """One Linear in a residual branch."""

    def __init__(self, width):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


class Attentionish(nn.Module):
    """LLaMA's layer order: q/k/v read one input, o reads their mix, gate/up one input, down."""

    def __init__(self, width=16):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.gate, self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x):
        h = torch.nn.functional.layer_norm(x, x.shape[-1:])
        x = x + self.o(torch.tanh(self.q(h)) * self.k(h) + self.v(h))
        h = torch.nn.functional.layer_norm(x, x.shape[-1:])
        return x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


class Residual(nn.Module):
    """``depth`` chained blocks (``Block`` by default) named ``blocks.0`` ..."""

    def __init__(self, width=32, depth=3, block=Block):
        super().__init__()
        self.blocks = nn.ModuleList(block(width) for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x
