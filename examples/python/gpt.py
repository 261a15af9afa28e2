"""A small GPT-style causal language model (character level) and the text it trains on."""
import math
import pydoc
import sys

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab, block=128, width=256, layers=4, heads=4):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(block, width)
        self.blocks = nn.Sequential(*[Block(width, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02 / (math.sqrt(2 * layers) if name.endswith("proj.weight") else 1.0))
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx, targets=None):
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        logits = self.head(self.ln(self.blocks(x)))
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def corpus_text(min_chars=300_000):
    """English text generated from the documentation of the Python standard library on this
    machine: real prose and code comments, no download. Deterministic for a Python version."""
    parts, seen = [], set()
    total = 0
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"}:
            continue
        try:
            module = __import__(name)
        except Exception:  # noqa: BLE001 - some modules do not import on every platform
            continue
        docs = [pydoc.getdoc(module)]
        for attr in sorted(vars(module)):
            obj = getattr(module, attr, None)
            if not attr.startswith("_") and (isinstance(obj, type) or callable(obj)):
                docs.append(pydoc.getdoc(obj))
        for doc in docs:
            if len(doc) >= 200 and doc not in seen:
                seen.add(doc)
                parts.append(doc.strip() + "\n\n")
                total += len(parts[-1])
        if total >= min_chars:
            break
    text = "".join(parts)
    return "".join(c for c in text if c.isascii())


class CharDataset(torch.utils.data.Dataset):
    """Windows of `block` + 1 characters at a fixed stride; input and shifted target."""

    def __init__(self, text, block, stride=None):
        self.chars = sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.data = torch.tensor([self.stoi[c] for c in text], dtype=torch.long)
        self.block = block
        self.stride = stride or block // 2

    def __len__(self):
        return (len(self.data) - self.block - 1) // self.stride

    def __getitem__(self, i):
        chunk = self.data[i * self.stride: i * self.stride + self.block + 1]
        return chunk[:-1], chunk[1:]
