"""The architect moves alpha only, and its second-order gradient is the derivative of eq. 6 in the paper."""

from __future__ import annotations

import math

import pytest
import torch

from worker.search.architect import Architect
from worker.search.engine import Search
from worker.search.schedule import build_arch_optimizer, check_disjoint

from .factories import forecast_spec, tiny_series


def make_search(**overrides: object) -> Search:
    return Search(forecast_spec(**overrides), tiny_series(), torch.device("cpu"))


def batches(search: Search) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    search.batches.begin_epoch(search.data_gen)
    return search.batches.train_batch(0), search.batches.valid_batch(0)


@pytest.mark.parametrize("order", ["first", "second"])
def test_an_architect_step_moves_alpha_and_leaves_weights_and_their_lr_alone(order: str) -> None:
    search = make_search(search={"order": order}, optimizer={"type": "SGD", "lr": 0.05, "momentum": 0.9})
    train, valid = batches(search)
    weights_before = [w.detach().clone() for w in search.weights]
    alpha_before = search.model.alpha.detach().clone()
    lr_before = search.weight_optimizer.param_groups[0]["lr"]
    h = search.hidden(train[0].shape[0])
    search.architect.step(train, h, valid, h)
    assert not torch.equal(search.model.alpha, alpha_before)
    for w, before in zip(search.weights, weights_before, strict=True):
        assert torch.equal(w, before), "the weights are restored bit for bit"
        assert w.grad is None
    assert search.weight_optimizer.param_groups[0]["lr"] == lr_before
    assert not search.weight_optimizer.state, "the weights' optimizer took no step"
    assert search.arch_optimizer.param_groups[0]["lr"] == search.spec.arch_optimizer.lr


def test_alpha_and_weights_live_in_separate_optimizers() -> None:
    search = make_search()
    alpha = search.model.arch_parameters()
    weight_ids = {id(p) for g in search.weight_optimizer.param_groups for p in g["params"]}
    assert id(search.model.alpha) not in weight_ids
    assert weight_ids == {id(p) for p in search.model.parameters()} - {id(search.model.alpha)}
    shared = build_arch_optimizer(search.spec.arch_optimizer, [*alpha, search.weights[0]])
    with pytest.raises(RuntimeError, match="both"):
        check_disjoint(search.weight_optimizer, shared, alpha)


def test_xi_follows_the_weights_current_lr_unless_fixed() -> None:
    search = make_search(search={"order": "second"})
    search.weight_optimizer.param_groups[0]["lr"] = 0.0123
    assert search.architect.current_xi() == 0.0123
    fixed = make_search(search={"order": "second", "xi": 0.5})
    fixed.weight_optimizer.param_groups[0]["lr"] = 0.0123
    assert fixed.architect.current_xi() == 0.5


@pytest.mark.parametrize(
    ("hessian_eps", "rtol", "grad_clip"),
    # The paper's step (0.01 in weight space) approximates the Hessian-vector product to about 1% on this
    # small, curved network; a tiny step shows the formula itself is exact, with and without clipping.
    [(0.01, 3e-2, math.inf), (1e-6, 1e-5, math.inf), (1e-6, 1e-5, 0.05)],
    ids=["paper-step", "tiny-step", "tiny-step-clipped"],
)
def test_second_order_alpha_gradient_agrees_with_finite_differences(
    hessian_eps: float, rtol: float, grad_clip: float
) -> None:
    """d/da L_val(w - xi (k grad_w L_train(w, a) + wd w), a), by central differences in float64, where k
    clips the gradient to grad_clip and is held fixed, as the paper's code treats it."""
    search = make_search(
        model={"steps": 2},
        search={"order": "second", "xi": 0.5, "batch_size": 32},
        optimizer={"type": "SGD", "lr": 0.1, "weight_decay": 0.01},
    )
    model = search.model.double()
    (xt, yt), (xv, yv) = batches(search)
    xt, yt, xv, yv = xt.double(), yt.double(), xv.double(), yv.double()
    h_t, h_v = model.init_hidden(xt.shape[0]), model.init_hidden(xv.shape[0])
    architect = Architect(
        model,
        search.weight_optimizer,
        search.arch_optimizer,
        order="second",
        xi=0.5,
        weight_decay=0.01,
        grad_clip=grad_clip,
        hessian_eps=hessian_eps,
    )
    grad, _ = architect.second_order_grad((xt, yt), h_t, (xv, yv), h_v)

    weights = list(model.weight_parameters())
    base_grads = torch.autograd.grad(model.loss(xt, yt, h_t)[0], weights)
    norm = float(torch.sqrt(sum((g * g).sum() for g in base_grads)))  # type: ignore[arg-type]
    clip = min(1.0, grad_clip / (norm + 1e-6))
    assert (clip < 0.5) == (grad_clip < 1), "the clipped case must really clip"

    def unrolled_val_loss() -> float:
        loss, _ = model.loss(xt, yt, h_t)
        grads = torch.autograd.grad(loss, weights)
        saved = [w.detach().clone() for w in weights]
        with torch.no_grad():
            for w, g in zip(weights, grads, strict=True):
                w.sub_(0.5 * (clip * g + 0.01 * w))
            value = float(model.loss(xv, yv, h_v)[0])
            for w, s in zip(weights, saved, strict=True):
                w.copy_(s)
        return value

    eps = 1e-5
    numeric = torch.zeros_like(grad)
    for index in range(grad.numel()):
        e, k = divmod(index, grad.shape[1])
        with torch.no_grad():
            model.alpha[e, k] += eps
        plus = unrolled_val_loss()
        with torch.no_grad():
            model.alpha[e, k] -= 2 * eps
        minus = unrolled_val_loss()
        with torch.no_grad():
            model.alpha[e, k] += eps
        numeric[e, k] = (plus - minus) / (2 * eps)
    scale = float(numeric.abs().max())
    assert float((grad - numeric).abs().max()) <= rtol * scale
    first_order = torch.autograd.grad(model.loss(xv, yv, h_v)[0], [model.alpha])[0]
    assert float((first_order - numeric).abs().max()) > 10 * rtol * scale, "the check must tell the orders apart"


def test_the_virtual_step_uses_the_clipped_gradient() -> None:
    """At lr 20 an unclipped virtual step throws the weights thousands away and alpha turns NaN (found by the
    benchmark at the paper's size); the paper's code clips the gradient first, and so do we."""
    search = make_search(
        search={"order": "second", "grad_clip": 0.25}, optimizer={"type": "SGD", "lr": 20.0, "weight_decay": 0.0}
    )
    model, architect = search.model, search.architect
    train, valid = batches(search)
    before = torch.cat([w.detach().flatten().clone() for w in search.weights])
    at_valid: list[torch.Tensor] = []
    loss = model.loss

    def spy(inputs: torch.Tensor, targets: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if inputs is valid[0]:  # the validation pass runs at the virtual weights w'
            at_valid.append(torch.cat([w.detach().flatten().clone() for w in search.weights]))
        return loss(inputs, targets, hidden)

    model.loss = spy  # type: ignore[method-assign]
    h = search.hidden(train[0].shape[0])
    architect.step(train, h, valid, h)
    (virtual,) = at_valid
    moved = float((virtual - before).norm())
    assert 0 < moved <= 20.0 * 0.25 * (1 + 1e-5)  # xi * grad_clip
    assert torch.equal(torch.cat([w.detach().flatten() for w in search.weights]), before)
