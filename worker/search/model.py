"""Search networks: the DARTS cell wrapped for language modelling or forecasting, plus genotype derivation."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cell import CellNorm, n_edges, run_cell, softmax_alpha
from .spec import PRIMITIVES, JobSpec

INIT_RANGE = 0.04  # the paper's uniform init range for the cell's matrices


def derive_genotype(probs: list[list[float]], steps: int) -> dict[str, Any]:
    """Per node, the strongest non-`none` op over its strongest incoming edge (the paper's rule)."""
    none = PRIMITIVES.index("none")
    recurrent: list[list[Any]] = []
    start = 0
    for i in range(steps):
        rows = probs[start : start + i + 1]
        strength = [max(w for k, w in enumerate(row) if k != none) for row in rows]
        j = max(range(i + 1), key=lambda e: (strength[e], -e))  # ties: the earliest input, as sorted() would
        row = rows[j]
        k = max((k for k in range(len(row)) if k != none), key=lambda k: (row[k], -k))
        recurrent.append([PRIMITIVES[k], j])
        start += i + 1
    return {"recurrent": recurrent, "concat": list(range(1, steps + 1))}


class SearchNetwork(nn.Module):
    """The cell's parameters, alpha, and what both tasks share; subclasses add input and output layers."""

    bn_mean: Tensor
    bn_var: Tensor

    def __init__(self, spec: JobSpec, ninp: int, generator: torch.Generator) -> None:
        super().__init__()
        m = spec.model
        self.nhid, self.steps = m.nhid, m.steps
        self.dropout, self.dropouth, self.dropoutx, self.dropouti = m.dropout, m.dropouth, m.dropoutx, m.dropouti
        self.w0 = nn.Parameter(_uniform((ninp + m.nhid, 2 * m.nhid), INIT_RANGE, generator))
        self.ws = nn.Parameter(_uniform((m.steps, m.nhid, 2 * m.nhid), INIT_RANGE, generator))
        self.alpha = nn.Parameter(1e-3 * torch.randn(n_edges(m.steps), len(PRIMITIVES), generator=generator))
        self.register_buffer("bn_mean", torch.zeros(m.nhid))  # the cell's batch norm statistics
        self.register_buffer("bn_var", torch.ones(m.nhid))
        self.cell_impl = "fused"
        self.grads_for = "all"  # see only_grads_for
        self.gen: torch.Generator | None = None  # dropout masks come from here; set by the search

    def loss(self, inputs: Tensor, targets: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """The task's loss on one batch and the hidden state to carry on."""
        raise NotImplementedError

    def weight_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter except alpha: what the weights' optimizer and its schedule own."""
        return (p for name, p in self.named_parameters() if name != "alpha")

    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alpha]

    def probs(self) -> Tensor:
        return softmax_alpha(self.alpha)

    def init_hidden(self, batch: int) -> Tensor:
        return self.w0.new_zeros(batch, self.nhid)

    def _locked(self, x: Tensor, p: float) -> Tensor:
        """Locked (variational) dropout: one mask per sequence, shared by its time steps; x (T, B, D)."""
        mask = self._mask((1, x.shape[1], x.shape[2]), p)
        return x if mask is None else x * mask

    def _mask(self, shape: tuple[int, ...], p: float) -> Tensor | None:
        if not self.training or p == 0:
            return None
        return self.w0.new_empty(shape).bernoulli_(1 - p, generator=self.gen) / (1 - p)

    def recur(self, x: Tensor, hidden: Tensor) -> Tensor:
        """Run the cell over x (T, B, ninp) from hidden (B, H); returns outputs (T, B, H)."""
        ninp = x.shape[-1]
        x_mask = self._mask((1, x.shape[1], ninp), self.dropoutx)
        if x_mask is not None:
            x = x * x_mask
        xproj = x @ self.w0[:ninp]  # (T, B, 2H): the input's share of s_0, for all steps at once
        h_mask = self._mask((x.shape[1], self.nhid), self.dropouth)
        bn = CellNorm(self.bn_mean, self.bn_var, self.training)
        w0h, probs = self.w0[ninp:], self.probs()
        ws: Tensor = self.ws
        # The fused cell is one autograd node that cannot see which gradients a pass asks for (autograd
        # prunes the reference's ops by itself), so a pass for one side detaches the other side here.
        if self.grads_for == "alpha":
            w0h, ws = w0h.detach(), ws.detach()
        elif self.grads_for == "weights":
            probs = probs.detach()
        return run_cell(xproj, hidden, w0h, ws, probs, h_mask, bn, self.cell_impl)

    @contextmanager
    def only_grads_for(self, side: str) -> Iterator[None]:
        """Within this block the cell computes gradients for `side` ("alpha" or "weights") only."""
        before, self.grads_for = self.grads_for, side
        try:
            yield
        finally:
            self.grads_for = before


class LanguageModel(SearchNetwork):
    """Embedding, search cell, decoder tied to the embedding; loss is cross entropy per token."""

    def __init__(self, spec: JobSpec, ntoken: int, generator: torch.Generator) -> None:
        super().__init__(spec, spec.model.emsize, generator)
        self.dropoute = spec.model.dropoute or 0.0
        self.encoder = nn.Embedding(ntoken, spec.model.emsize)
        self.encoder.weight.data = _uniform((ntoken, spec.model.emsize), 0.1, generator)
        self.decoder_bias = nn.Parameter(torch.zeros(ntoken))

    def loss(self, inputs: Tensor, targets: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """inputs, targets: (T, B) token ids; returns (mean loss per token, last hidden (B, H))."""
        weight = self.encoder.weight
        if self.training and self.dropoute > 0:  # drop whole words from the embedding matrix
            keep = weight.new_empty(weight.shape[0], 1).bernoulli_(1 - self.dropoute, generator=self.gen)
            weight = weight * keep / (1 - self.dropoute)
        emb = F.embedding(inputs, weight)  # (T, B, E)
        emb = self._locked(emb, self.dropouti)
        out = self.recur(emb, hidden)  # (T, B, H)
        last = out[-1]
        out = self._locked(out, self.dropout)
        logits = F.linear(out.view(-1, self.nhid), self.encoder.weight, self.decoder_bias)  # (T*B, V)
        return F.cross_entropy(logits, targets.reshape(-1)), last


class Forecaster(SearchNetwork):
    """Input projection, search cell over the window, regression head for `horizon` steps of every column."""

    def __init__(self, spec: JobSpec, features: int, generator: torch.Generator) -> None:
        super().__init__(spec, spec.model.emsize, generator)
        self.features, self.horizon = features, spec.model.horizon or 1
        self.proj = nn.Linear(features, spec.model.emsize)
        self.head = nn.Linear(spec.model.nhid, features * self.horizon)
        for layer in (self.proj, self.head):
            bound = 1.0 / layer.in_features**0.5
            layer.weight.data = _uniform(tuple(layer.weight.shape), bound, generator)
            layer.bias.data = _uniform(tuple(layer.bias.shape), bound, generator)

    def loss(self, inputs: Tensor, targets: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """inputs (B, W, F), targets (B, horizon, F), normalised; returns (MSE, last hidden)."""
        x = self.proj(inputs.transpose(0, 1))  # (W, B, E)
        x = self._locked(x, self.dropouti)
        last = self.recur(x, hidden)[-1]  # (B, H)
        mask = self._mask(tuple(last.shape), self.dropout)
        out = last if mask is None else last * mask
        pred = self.head(out).view(-1, self.horizon, self.features)  # (B, horizon, F)
        return F.mse_loss(pred, targets), last


def _uniform(shape: tuple[int, ...], bound: float, generator: torch.Generator) -> Tensor:
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)
