"""The architect: one Adam step on alpha from a validation batch, first or second order (DARTS eq. 6-8)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

Batch = tuple[Tensor, Tensor]


class Architect:
    """Updates alpha only. The second-order step takes a virtual SGD step on the weights,
    w' = w - xi * (k * dL_train/dw + weight_decay * w), with k the factor that clips the gradient to
    `grad_clip` (as the paper's code does: an unclipped virtual step at lr 20 throws the weights far
    away), and approximates the Hessian-vector product of eq. 8 by central differences, scaled by the
    same k; the weights are restored bit for bit afterwards.

    `xi` is a number, or None to follow the weights' current learning rate.
    """

    def __init__(
        self,
        model: Any,
        weight_optimizer: torch.optim.Optimizer,
        arch_optimizer: torch.optim.Optimizer,
        *,
        order: str,
        xi: float | None,
        weight_decay: float,
        grad_clip: float = math.inf,
        hessian_eps: float = 0.01,
    ) -> None:
        self.model = model
        self.weight_optimizer = weight_optimizer
        self.arch_optimizer = arch_optimizer
        self.second_order = order == "second"
        self.xi = xi
        self.weight_decay = weight_decay
        self.grad_clip = grad_clip
        self.hessian_eps = hessian_eps  # the paper's 0.01: the weights move by this much (L2) each way

    def current_xi(self) -> float:
        return float(self.weight_optimizer.param_groups[0]["lr"]) if self.xi is None else self.xi

    def step(self, train: Batch, train_hidden: Tensor, valid: Batch, valid_hidden: Tensor) -> Tensor:
        """One update of alpha; returns the validation hidden state to carry on."""
        if self.second_order:
            grad, hidden = self.second_order_grad(train, train_hidden, valid, valid_hidden)
        else:
            with self.model.only_grads_for("alpha"):
                loss, hidden = self.model.loss(*valid, valid_hidden)
                (grad,) = torch.autograd.grad(loss, [self.model.alpha])
        self.model.alpha.grad = grad
        self.arch_optimizer.step()
        self.model.alpha.grad = None
        return hidden.detach()

    def second_order_grad(
        self, train: Batch, train_hidden: Tensor, valid: Batch, valid_hidden: Tensor
    ) -> tuple[Tensor, Tensor]:
        """d L_val(w - xi grad_w L_train(w, a), a) / d a, with the Hessian term by finite differences."""
        model, alpha = self.model, self.model.alpha
        weights = list(model.weight_parameters())
        xi = self.current_xi()
        gen = model.gen
        train_masks = gen.get_state() if gen is not None else None  # the same dropout masks for every L_train

        with model.only_grads_for("weights"):
            loss, _ = model.loss(*train, train_hidden)
            grads = torch.autograd.grad(loss, weights)
        grad_norm = float(torch.sqrt(sum((g * g).sum() for g in grads)))  # type: ignore[arg-type]
        clip = min(1.0, self.grad_clip / (grad_norm + 1e-6))  # what clip_grad_norm_ scales the step by
        saved = [w.detach().clone() for w in weights]
        with torch.no_grad():
            for w, g in zip(weights, grads, strict=True):
                w.sub_(xi * (clip * g + self.weight_decay * w))  # the virtual step
        loss, hidden = model.loss(*valid, valid_hidden)
        d_alpha, *d_weights = torch.autograd.grad(loss, [alpha, *weights])
        after_valid = gen.get_state() if gen is not None else None

        norm = torch.sqrt(sum((d * d).sum() for d in d_weights))  # type: ignore[arg-type]
        if xi == 0 or float(norm) == 0.0:
            _restore(weights, saved)
            return d_alpha, hidden
        r = self.hessian_eps / norm
        grads_at = []
        for sign in (1.0, -1.0):  # grad_a L_train(w +- r dw', a)
            with torch.no_grad():
                for w, w0, d in zip(weights, saved, d_weights, strict=True):
                    w.copy_(w0 + sign * r * d)
            if gen is not None and train_masks is not None:
                gen.set_state(train_masks)
            with model.only_grads_for("alpha"):
                loss, _ = model.loss(*train, train_hidden)
                grads_at.append(torch.autograd.grad(loss, [alpha])[0])
        _restore(weights, saved)
        if gen is not None and after_valid is not None:
            gen.set_state(after_valid)  # later draws do not repeat the masks of the passes above
        hessian_vector = (grads_at[0] - grads_at[1]) / (2 * r)
        return d_alpha - xi * clip * hessian_vector, hidden


def _restore(weights: list[torch.nn.Parameter], saved: list[Tensor]) -> None:
    with torch.no_grad():
        for w, w0 in zip(weights, saved, strict=True):
            w.copy_(w0)
