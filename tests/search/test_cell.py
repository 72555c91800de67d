"""The fused cell computes exactly the paper's equations: same outputs, gradients and batch-norm statistics
as the literal formulation, in training and evaluation mode, with and without dropout masks."""

from __future__ import annotations

import pytest
import torch

from worker.search.cell import CellNorm, fused_cell_step, n_edges, reference_cell_step, run_cell, softmax_alpha

B, H, STEPS = 5, 4, 3
F64 = torch.float64


def make_inputs(seed: int, *, masked: bool) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    return {
        "xproj": torch.randn(B, 2 * H, dtype=F64, generator=g).requires_grad_(),
        "h_prev": torch.randn(B, H, dtype=F64, generator=g).requires_grad_(),
        "w0h": (0.5 * torch.randn(H, 2 * H, dtype=F64, generator=g)).requires_grad_(),
        "ws": (0.5 * torch.randn(STEPS, H, 2 * H, dtype=F64, generator=g)).requires_grad_(),
        "alpha": torch.randn(n_edges(STEPS), 5, dtype=F64, generator=g).requires_grad_(),
        "h_mask": (torch.rand(B, H, dtype=F64, generator=g) > 0.3).to(F64) / 0.7 if masked else None,
    }


def norm(training: bool) -> CellNorm:
    return CellNorm(torch.linspace(-0.2, 0.3, H, dtype=F64), torch.linspace(0.5, 1.5, H, dtype=F64), training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_fused_equals_reference_in_value_gradient_and_statistics(training: bool, masked: bool) -> None:
    t = make_inputs(1, masked=masked)
    bn_fused, bn_ref = norm(training), norm(training)
    args = (t["xproj"], t["h_prev"], t["w0h"], t["ws"])
    alpha = t["alpha"]
    fused = fused_cell_step(*args, softmax_alpha(alpha), t["h_mask"], bn_fused)  # type: ignore[arg-type]
    ref = reference_cell_step(*args, softmax_alpha(alpha), t["h_mask"], bn_ref)  # type: ignore[arg-type]
    torch.testing.assert_close(fused, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(bn_fused.running_mean, bn_ref.running_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(bn_fused.running_var, bn_ref.running_var, rtol=0, atol=1e-12)
    inputs = [*args, t["alpha"]]
    grads_fused = torch.autograd.grad(fused.sin().sum(), inputs)  # type: ignore[arg-type]
    grads_ref = torch.autograd.grad(ref.sin().sum(), inputs)  # type: ignore[arg-type]
    for name, a, b in zip(["xproj", "h_prev", "w0h", "ws", "alpha"], grads_fused, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=f"gradient of {name}")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_backward_passes_gradcheck(training: bool) -> None:
    t = make_inputs(2, masked=True)

    def step(xproj: torch.Tensor, h: torch.Tensor, w0h: torch.Tensor, ws: torch.Tensor, alpha: torch.Tensor):
        return fused_cell_step(xproj, h, w0h, ws, softmax_alpha(alpha), t["h_mask"], norm(training))

    assert torch.autograd.gradcheck(step, (t["xproj"], t["h_prev"], t["w0h"], t["ws"], t["alpha"]))


def test_unrolled_sequence_matches_and_mean_of_nodes_is_the_output() -> None:
    t = make_inputs(3, masked=False)
    xs = torch.randn(6, B, 2 * H, dtype=F64)
    probs = softmax_alpha(t["alpha"])  # type: ignore[arg-type]
    out_f = run_cell(xs, t["h_prev"], t["w0h"], t["ws"], probs, None, norm(True), "fused")  # type: ignore[arg-type]
    out_r = run_cell(xs, t["h_prev"], t["w0h"], t["ws"], probs, None, norm(True), "reference")  # type: ignore[arg-type]
    assert out_f.shape == (6, B, H)
    torch.testing.assert_close(out_f, out_r, rtol=0, atol=1e-10)


def test_only_none_weight_on_every_edge_keeps_the_highway_input_out() -> None:
    """With all probability on `none`, every intermediate node is the batch norm of zero: output is 0."""
    t = make_inputs(4, masked=False)
    alpha = torch.full((n_edges(STEPS), 5), -1e4, dtype=F64)
    alpha[:, 0] = 0.0
    out = fused_cell_step(
        t["xproj"],
        t["h_prev"],
        t["w0h"],
        t["ws"],
        softmax_alpha(alpha),
        None,
        norm(True),  # type: ignore[arg-type]
    )
    torch.testing.assert_close(out, torch.zeros(B, H, dtype=F64), rtol=0, atol=1e-6)
