"""Dynamic ConPET's selector: a small classifier on the frozen base model's pooled final hidden state
that routes each input to its top-k experts (the base itself is expert 0, the per-update adapters follow).

Features come from megatron-core's own ``GPTModel`` forward: a forward hook on the decoder (whose output is
the final-norm hidden state, [s, b, h]) captures them with every adapter switched off; the mean over
tokens is the feature. The selector's training is a plain classification loop, not an LM loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lrpath_megatron.adapters.lora import set_active
from lrpath_megatron.config import ConfigError


@dataclass
class SelectorConfig:
    steps: int = 100  # batches per update (fixed: the cost does not grow with the number of updates)
    lr: float = 1e-2
    hidden: int = 64  # 0 = a linear classifier
    top_k: int = 1
    eval_batches: int = 8  # held-out micro-batches per corpus for the accuracy

    def validate(self, where: str = "adapt.selector") -> "SelectorConfig":
        for name in ("steps", "top_k", "eval_batches"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}.{name}={getattr(self, name)} must be > 0")
        if self.lr <= 0 or self.hidden < 0:
            raise ConfigError(f"{where}.lr must be > 0 and {where}.hidden >= 0")
        return self


class Selector(nn.Module):
    def __init__(self, hidden_size: int, num_classes: int, hidden: int):
        super().__init__()
        # Pooled states of all domains share a large common mean; domains differ in small offsets from it,
        # so features are standardised per dimension (running statistics, frozen at inference).
        self.norm = nn.BatchNorm1d(hidden_size, affine=False)
        self.body = nn.Sequential(nn.Linear(hidden_size, hidden), nn.GELU()) if hidden else nn.Identity()
        self.head = nn.Linear(hidden or hidden_size, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.norm(features)))

    def add_class(self) -> None:
        """One more expert: the old rows are kept, the new one starts at zero."""
        old = self.head
        self.head = nn.Linear(old.in_features, old.out_features + 1)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.zero_()
            self.head.weight[:-1].copy_(old.weight)
            self.head.bias[:-1].copy_(old.bias)


def token_losses(model, batch: dict) -> torch.Tensor:
    """Per-token loss [b, s] of a micro-batch through megatron-core's GPTModel forward."""
    device = next(model.parameters()).device
    b = {k: v.to(device) for k, v in batch.items()}
    return model(b["tokens"], b["position_ids"], None, labels=b["labels"]).float().cpu()


@torch.no_grad()
def pooled_features(model, batch: dict) -> torch.Tensor:
    """[b, h] mean over tokens of the frozen base's final hidden state (no adapter active)."""
    inner = getattr(model, "module", model)
    captured = {}
    handle = inner.decoder.register_forward_hook(lambda mod, args, out: captured.__setitem__("h", out))
    set_active(inner, None)
    try:
        token_losses(inner, batch)  # with labels the model returns the loss, not full-vocab logits
    finally:
        handle.remove()
    hidden = captured["h"][0] if isinstance(captured["h"], tuple) else captured["h"]
    return hidden.float().mean(dim=0)


def train_selector(selector: Selector, model, batches: Callable[[int], tuple[dict, torch.Tensor]],
                   cfg: SelectorConfig, progress: bool = True) -> list[float]:
    """``batches(step) -> (micro-batch, class labels)``; returns the loss per step."""
    from tqdm import tqdm

    opt = torch.optim.AdamW(selector.parameters(), lr=cfg.lr, weight_decay=0.0)
    losses = []
    selector.train()
    for step in tqdm(range(cfg.steps), desc="selector", disable=not progress):
        batch, labels = batches(step)
        loss = F.cross_entropy(selector(pooled_features(model, batch)), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    selector.eval()
    return losses


@torch.no_grad()
def route(selector: Selector, model, batch: dict, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert indices [b, k], renormalised weights [b, k]) of each input."""
    probs = torch.softmax(selector(pooled_features(model, batch)), dim=-1)
    weights, index = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    return index, weights / weights.sum(dim=-1, keepdim=True)


@torch.no_grad()
def routed_token_losses(selector: Selector, model, batch: dict, experts: list[Optional[str]],
                        top_k: int) -> torch.Tensor:
    """Per-token loss [b, s] of the routed model: each input runs through its top-k experts and their
    next-token probabilities are mixed by the selector's weights. Cost per input: one feature pass plus
    ``top_k`` expert passes, whatever the number of experts."""
    index, weights = route(selector, model, batch, top_k)
    seq = batch["tokens"].shape[1]
    log_terms = torch.full((index.shape[0], index.shape[1], seq), float("-inf"))
    for j in range(index.shape[1]):
        for expert in index[:, j].unique().tolist():
            rows = (index[:, j] == expert).nonzero().flatten()
            set_active(model, experts[expert])
            token_loss = token_losses(model, {k: v[rows] for k, v in batch.items()})
            log_terms[rows, j] = weights[rows, j, None].log().cpu() - token_loss
    set_active(model, None)
    return -torch.logsumexp(log_terms, dim=1)
