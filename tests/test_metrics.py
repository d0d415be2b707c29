"""compare(): R3 routing-mismatch figures on routes with known differences."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import moe_replay as mr

T, E, K = 20, 8, 2
NAMES = ("layers.0.gate", "layers.1.gate", "layers.2.gate")


def base(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) for _ in NAMES]


def routes(layers: list[torch.Tensor]) -> mr.Routes:
    return mr.Routes(layers, names=NAMES, num_experts=E)


def replace_expert(row: torch.Tensor) -> torch.Tensor:
    """The same row with its second expert swapped for one it did not choose."""
    free = [e for e in range(E) if e not in row.tolist()]
    return torch.tensor([row[0].item(), free[0]])


def test_known_differences() -> None:
    a = base()
    b = [x.clone() for x in a]
    changed = {0: [1, 2, 3], 1: [3], 2: []}  # router -> tokens whose decision differs
    for layer, toks in changed.items():
        for t in toks:
            b[layer][t] = replace_expert(a[layer][t])
    b[2][5] = a[2][5].flip(0)  # same experts, other slot order: the same decision as a set
    a[1][7] = -1  # a missing row: excluded, counted
    c = mr.compare(routes(a), routes(b))
    assert c.differ.tolist() == [3, 1, 0] and c.compared.tolist() == [T, T - 1, T] and c.excluded.tolist() == [0, 1, 0]
    assert c.per_layer[0] == 3 / T and c.overall == 4 / (3 * T - 1)
    assert c.tokens == T and c.tokens_differ == 3  # tokens 1, 2, 3 (token 3 differs in two routers)
    assert c.token_fraction == 3 / T and c.routers_per_token == 4 / T
    assert c.overlap == 1 - 4 / (2 * (3 * T - 1))  # each changed decision keeps one of its two experts
    slot = mr.compare(routes(a), routes(b), mode="slot")
    assert slot.differ.tolist() == [3, 1, 1]
    assert c.load_a.shape == (3, E) and c.load_a.sum() == K * (3 * T - 1) == c.load_b.sum()
    assert c.load_a[0].tolist() == torch.bincount(a[0].reshape(-1), minlength=E).tolist()


def test_identical_and_router_order() -> None:
    a = routes(base())
    flipped = mr.Routes([x.flip(1) for x in base()], names=NAMES, num_experts=E)
    c = mr.compare(a, flipped.select(list(reversed(NAMES))))  # matched by name, not position
    assert c.overall == 0.0 and c.tokens_differ == 0 and c.overlap == 1.0
    assert mr.compare(a, flipped, mode="slot").overall == 1.0
    assert mr.compare(a, a, names=NAMES[:1]).names == NAMES[:1]


def test_repr_and_dict() -> None:
    a, b = base(), base(1)
    c = mr.compare(routes(a), routes(b))
    text = repr(c)
    assert text.startswith("RoutingComparison(mode='set', routers=3, tokens=20, excluded_rows=0)")
    assert f"{100 * c.overall:.2f}%" in text and "layers.2.gate:" in text
    d = c.as_dict()
    assert d["overall"] == c.overall and set(d["per_layer"]) == set(NAMES)


def test_errors() -> None:
    a = routes(base())
    with pytest.raises(mr.RoutesValidationError, match="different routers"):
        mr.compare(a, a.select(NAMES[:2]))
    with pytest.raises(mr.RoutesValidationError, match="different token counts"):
        mr.compare(a, a[:5])
    with pytest.raises(ValueError, match="mode must be"):
        mr.compare(a, a, mode="jaccard")
    other = mr.Routes(base(), names=NAMES, num_experts=E + 1)
    with pytest.raises(mr.RoutesValidationError, match="over 8"):
        mr.compare(a, other)


def test_all_missing_gives_nan_not_zero() -> None:
    empty = mr.Routes([torch.full((T, K), -1)] * 3, names=NAMES, num_experts=E)
    c = mr.compare(empty, routes(base()))
    assert c.tokens == 0 and np.isnan(c.overall) and np.isnan(c.per_layer).all() and "n/a" in repr(c)


def test_plot(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    c = mr.compare(routes(base()), routes(base(1)))
    fig = c.plot()
    left, right = fig.axes
    assert len(left.patches) == 3 and len(right.patches) == 2 * E
    assert len(c.plot(router=NAMES[1]).axes[1].patches) == 2 * E
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"moe_replay\[plot\]"):
        c.plot()
