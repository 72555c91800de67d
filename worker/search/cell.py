"""The DARTS recurrent search cell, one time step at a time.

Equations (Liu et al. 2019, the search cell of their code), with H = nhid and E = steps*(steps+1)/2
edges, edge e = (j -> i+1) carrying softmax weights p[e] over PRIMITIVES:

    [a, b]  = x W0x + (h_prev * mask) W0h                           # (B, 2H)
    s_0     = BN(h_prev + sigmoid(a) * (tanh(b) - h_prev))
    [c, h]  = (s_j * mask) W_i                                       # per predecessor j <= i
    s_{i+1} = BN(sum_j sum_{k != none} p[e,k] * (s_j + sigmoid(c) * (f_k(h) - s_j)))
    out     = mean(s_1 .. s_steps)

BN is a batch norm without affine parameters, shared by all nodes (batch statistics while training,
running statistics in eval): without it the summed node states grow geometrically and the search
diverges, which is why the paper's search code has it.

`reference_cell_step` computes this literally: one highway update per candidate operation, weighted and
summed, as the paper's code does. `fused_cell_step` uses the identity

    sum_k p_k (s + c (f_k(h) - s)) = lerp(P s, m, c),   P = sum_{k != none} p_k,  m = sum_k p_k f_k(h)

so each edge needs one highway update with a *mixed* activation m instead of four, and runs the whole
time step in one autograd node whose backward is written out by hand. Autograd then keeps only the
states and the pre-activations of each time step, not the dozens of intermediates of the literal form.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .spec import PRIMITIVES

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh,
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "identity": lambda x: x,
}
# Column of each primitive in alpha / probs; the fused kernel relies on this order.
NONE, TANH, RELU, SIGMOID, IDENTITY = range(len(PRIMITIVES))
assert PRIMITIVES == ("none", "tanh", "relu", "sigmoid", "identity")


def n_edges(steps: int) -> int:
    """Edges of a cell with `steps` intermediate nodes: node i+1 has i+1 predecessors."""
    return steps * (steps + 1) // 2


BN_MOMENTUM, BN_EPS = 0.1, 1e-5


@dataclass
class CellNorm:
    """The cell's batch norm: running statistics (buffers of the network) and the mode."""

    running_mean: Tensor  # (H,)
    running_var: Tensor  # (H,)
    training: bool

    def apply(self, x: Tensor) -> Tensor:
        """torch's own batch norm, for the reference formulation."""
        return F.batch_norm(
            x, self.running_mean, self.running_var, training=self.training, momentum=BN_MOMENTUM, eps=BN_EPS
        )

    def forward(self, x: Tensor, out: Tensor) -> Tensor:
        """Normalise x (B, H) into `out`, updating the running statistics; returns 1/std, (H,)."""
        if self.training:
            var, mean = torch.var_mean(x, 0, correction=0)
            with torch.no_grad():
                n = x.shape[0]
                self.running_mean.lerp_(mean, BN_MOMENTUM)
                self.running_var.lerp_(var * (n / max(n - 1, 1)), BN_MOMENTUM)
        else:
            mean, var = self.running_mean, self.running_var
        inv_std = (var + BN_EPS).rsqrt()
        torch.mul(x - mean, inv_std, out=out)
        return inv_std

    def backward(self, grad: Tensor, normed: Tensor, inv_std: Tensor) -> Tensor:
        """Gradient w.r.t. the input of `forward`, given the gradient w.r.t. its output."""
        if not self.training:
            return grad * inv_std
        return (grad - grad.mean(0) - normed * (grad * normed).mean(0)) * inv_std


def reference_cell_step(
    xproj: Tensor, h_prev: Tensor, w0h: Tensor, ws: Tensor, probs: Tensor, h_mask: Tensor | None, bn: CellNorm
) -> Tensor:
    """The literal formulation: per node one matmul over its predecessors, one highway update per op."""
    steps, nhid = ws.shape[0], ws.shape[1]
    masked_prev = h_prev if h_mask is None else h_prev * h_mask
    c0, h0 = torch.split(xproj + masked_prev @ w0h, nhid, dim=-1)
    s0 = bn.apply(h_prev + c0.sigmoid() * (h0.tanh() - h_prev))
    states = s0.unsqueeze(0)  # (n, B, H)
    offset = 0
    for i in range(steps):
        masked = states if h_mask is None else states * h_mask
        ch = (masked.reshape(-1, nhid) @ ws[i]).view(i + 1, -1, 2 * nhid)
        c, h = torch.split(ch, nhid, dim=-1)
        c = c.sigmoid()
        s = torch.zeros_like(s0)
        for k, name in enumerate(PRIMITIVES):
            if name == "none":
                continue
            unweighted = states + c * (_ACTIVATIONS[name](h) - states)
            s = s + torch.sum(probs[offset : offset + i + 1, k].view(-1, 1, 1) * unweighted, dim=0)
        states = torch.cat([states, bn.apply(s).unsqueeze(0)], 0)
        offset += i + 1
    return states[-steps:].mean(0)


def _mixed(hh: Tensor, p: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """m = sum_k p_k f_k(hh) over the non-none ops; also returns tanh, relu, sigmoid of hh."""
    t, r, g = hh.tanh(), hh.relu(), hh.sigmoid()
    m = hh * p[:, IDENTITY].view(-1, 1, 1)
    m.addcmul_(t, p[:, TANH].view(-1, 1, 1))
    m.addcmul_(r, p[:, RELU].view(-1, 1, 1))
    m.addcmul_(g, p[:, SIGMOID].view(-1, 1, 1))
    return m, t, r, g


class _FusedCellStep(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        xproj: Tensor,
        h_prev: Tensor,
        w0h: Tensor,
        ws: Tensor,
        probs: Tensor,
        h_mask: Tensor | None,
        bn: CellNorm,
    ) -> Tensor:
        steps, nhid = ws.shape[0], ws.shape[1]
        batch = h_prev.shape[0]
        mask = h_mask
        masked_prev = h_prev if mask is None else h_prev * mask
        pre0 = torch.addmm(xproj, masked_prev, w0h)  # (B, 2H)
        c0, h0 = pre0[:, :nhid].sigmoid(), pre0[:, nhid:].tanh()
        states = h_prev.new_empty(steps + 1, batch, nhid)  # s_0 .. s_steps, normalised
        inv_std = h_prev.new_empty(steps + 1, nhid)
        inv_std[0] = bn.forward(torch.lerp(h_prev, h0, c0), out=states[0])
        masked = states if mask is None else torch.empty_like(states)
        if mask is not None:
            torch.mul(states[0], mask, out=masked[0])
        pre = h_prev.new_empty(n_edges(steps), batch, 2 * nhid)  # [c, h] of every edge
        keep = probs[:, 1:].sum(1)  # P: total weight of the non-none ops per edge, (E,)
        offset = 0
        for i in range(steps):
            n = i + 1
            ch = pre[offset : offset + n]  # (n, B, 2H)
            torch.mm(masked[:n].view(n * batch, nhid), ws[i], out=ch.view(n * batch, 2 * nhid))
            c = ch[..., :nhid].sigmoid()
            m, _, _, _ = _mixed(ch[..., nhid:], probs[offset : offset + n])
            kept = states[:n] * keep[offset : offset + n].view(n, 1, 1)
            inv_std[i + 1] = bn.forward(torch.lerp(kept, m, c).sum(0), out=states[i + 1])
            if mask is not None:
                torch.mul(states[i + 1], mask, out=masked[i + 1])
            offset += n
        ctx.save_for_backward(h_prev, mask, w0h, ws, probs, c0, h0, states, pre, inv_std)
        ctx.bn = bn
        return states[1:].mean(0)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        h_prev, mask, w0h, ws, probs, c0, h0, states, pre, inv_std = ctx.saved_tensors
        bn: CellNorm = ctx.bn
        need_x, need_h, need_w0h, need_ws, need_p = ctx.needs_input_grad[:5]
        steps, nhid = ws.shape[0], ws.shape[1]
        batch = h_prev.shape[0]
        masked = states if mask is None else states * mask
        d_states = torch.zeros_like(states)
        d_states[1:] = grad_out / steps
        d_ws = torch.zeros_like(ws) if need_ws else None
        d_probs = torch.zeros_like(probs) if need_p else None
        keep = probs[:, 1:].sum(1)
        offset = n_edges(steps)
        for i in reversed(range(steps)):
            n = i + 1
            offset -= n
            # d_states[i+1] is complete: s_{i+1} only feeds later nodes and the mean
            g = bn.backward(d_states[i + 1], states[i + 1], inv_std[i + 1])  # (B, H), before the norm
            ch = pre[offset : offset + n]
            hh = ch[..., nhid:]
            c = ch[..., :nhid].sigmoid()
            p = probs[offset : offset + n]
            kp = keep[offset : offset + n].view(n, 1, 1)
            m, t, r, sg = _mixed(hh, p)
            s = states[:n]
            g_m = g * c  # d/dm, (n, B, H)
            g_keep = g - g_m  # d/d(P s) = g (1 - c)
            d_states[:n].addcmul_(g_keep, kp)
            d_pre = torch.empty_like(ch)
            # d/dc_pre = g (m - P s) c (1 - c)
            torch.mul(g * (m - kp * s), c * (1 - c), out=d_pre[..., :nhid])
            # d/dh = g c (p_tanh (1 - t^2) + p_relu [h > 0] + p_sig sg (1 - sg) + p_id)
            slope = (1 - t * t).mul_(p[:, TANH].view(-1, 1, 1))
            slope.addcmul_((hh > 0).to(hh.dtype), p[:, RELU].view(-1, 1, 1))
            slope.addcmul_(sg * (1 - sg), p[:, SIGMOID].view(-1, 1, 1))
            slope.add_(p[:, IDENTITY].view(-1, 1, 1))
            torch.mul(g_m, slope, out=d_pre[..., nhid:])
            if d_probs is not None:
                d_keep = (g_keep * s).sum((1, 2))  # (n,)
                block = d_probs[offset : offset + n]
                for col, act in ((TANH, t), (RELU, r), (SIGMOID, sg), (IDENTITY, hh)):
                    block[:, col] = (g_m * act).sum((1, 2)) + d_keep
            flat = d_pre.view(n * batch, 2 * nhid)
            if d_ws is not None:
                torch.mm(masked[:n].view(n * batch, nhid).t(), flat, out=d_ws[i])
            d_masked = (flat @ ws[i].t()).view(n, batch, nhid)
            d_states[:n] += d_masked if mask is None else d_masked * mask
        g0 = bn.backward(d_states[0], states[0], inv_std[0])
        d_pre0 = h0.new_empty(batch, 2 * nhid)
        torch.mul(g0 * (h0 - h_prev), c0 * (1 - c0), out=d_pre0[:, :nhid])
        torch.mul(g0 * c0, 1 - h0 * h0, out=d_pre0[:, nhid:])
        d_h = None
        if need_h:
            d_masked_prev = d_pre0 @ w0h.t()
            d_h = g0 * (1 - c0) + (d_masked_prev if mask is None else d_masked_prev * mask)
        d_w0h = None
        if need_w0h:
            masked_prev = h_prev if mask is None else h_prev * mask
            d_w0h = masked_prev.t() @ d_pre0
        return (d_pre0 if need_x else None), d_h, d_w0h, d_ws, d_probs, None, None


def fused_cell_step(
    xproj: Tensor, h_prev: Tensor, w0h: Tensor, ws: Tensor, probs: Tensor, h_mask: Tensor | None, bn: CellNorm
) -> Tensor:
    """One time step of the search cell as a single autograd node (same result as the reference)."""
    out: Tensor = _FusedCellStep.apply(xproj, h_prev, w0h, ws, probs, h_mask, bn)
    return out


CELL_STEPS: dict[str, Callable[..., Tensor]] = {"fused": fused_cell_step, "reference": reference_cell_step}


def run_cell(
    xproj: Tensor,
    h0: Tensor,
    w0h: Tensor,
    ws: Tensor,
    probs: Tensor,
    h_mask: Tensor | None,
    bn: CellNorm,
    impl: str = "fused",
) -> Tensor:
    """Unroll the cell over a sequence: xproj (T, B, 2H) is the input's share of s_0's pre-activation."""
    step = CELL_STEPS[impl]
    h = h0  # (B, H)
    outputs = []
    for t in range(xproj.shape[0]):
        h = step(xproj[t], h, w0h, ws, probs, h_mask, bn)
        outputs.append(h)
    return torch.stack(outputs)  # (T, B, H)


def softmax_alpha(alpha: Tensor) -> Tensor:
    """Per-edge probabilities of the candidate operations, (E, len(PRIMITIVES))."""
    return F.softmax(alpha, dim=-1)
