"""Derivation of the discrete cell (the paper's rule) from alpha."""

from __future__ import annotations

from worker.search.model import derive_genotype
from worker.search.spec import PRIMITIVES


def row(**weights: float) -> list[float]:
    return [weights.get(name, 0.0) for name in PRIMITIVES]


def test_hand_made_alpha_gives_the_rules_genotype() -> None:
    probs = [
        # node 1: one edge (from s0); relu is the strongest non-none op
        row(none=0.9, relu=0.06, tanh=0.04),
        # node 2: edges from s0 and s1; the strongest non-none weight is sigmoid on s1
        row(tanh=0.5, relu=0.5),
        row(sigmoid=0.7, identity=0.3),
        # node 3: `none` dominates s0 but does not count; the best non-none is tanh on s2
        row(none=0.99, identity=0.01),
        row(relu=0.4, sigmoid=0.35, tanh=0.25),
        row(tanh=0.45, identity=0.3, relu=0.25),
    ]
    genotype = derive_genotype(probs, steps=3)
    assert genotype == {"recurrent": [["relu", 0], ["sigmoid", 1], ["tanh", 2]], "concat": [1, 2, 3]}


def test_ties_go_to_the_earliest_input_and_operation() -> None:
    uniform = row(none=0.2, tanh=0.2, relu=0.2, sigmoid=0.2, identity=0.2)
    genotype = derive_genotype([uniform, uniform, uniform], steps=2)
    assert genotype["recurrent"] == [["tanh", 0], ["tanh", 0]]
    assert genotype["concat"] == [1, 2]
