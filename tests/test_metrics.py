"""compare(): R3 routing-mismatch figures on routes with known differences."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import moe_replay as mr

from .conftest import examples, tried

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
    heights = [p.get_height() for p in left.patches]
    assert heights == pytest.approx([100 * x for x in c.per_layer])
    assert len(c.plot(router=NAMES[1]).axes[1].patches) == 2 * E
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(mr.MissingDependencyError, match=r"moe_replay\[plot\]"):
        c.plot()


def test_plot_labels_routers_and_expert_ticks() -> None:
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    a, b = routes(base()), routes(base(1))
    c = mr.compare(a, b, labels=("rollout", "training"))
    assert c.labels == ("rollout", "training") and "labels=('rollout', 'training')" in repr(c)
    assert mr.compare(a, b).labels == ("a", "b") and "labels" not in repr(mr.compare(a, b))
    left, right = c.plot().axes
    assert right.get_legend_handles_labels()[1] == ["rollout", "training"]
    assert [t.get_text() for t in right.get_legend().get_texts()] == ["rollout", "training"]
    # routers by layer number, the name pattern on the axis; not rotated
    assert [t.get_text() for t in left.get_xticklabels()] == [n.split(".")[1] for n in NAMES]
    assert left.get_xlabel() == "layer N (layers.N.gate)"
    assert all(t.get_rotation() == 0 for t in left.get_xticklabels())
    # whole experts only on the expert axis
    ticks = [t for t in right.get_xticks() if right.get_xlim()[0] <= t <= right.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    with pytest.raises(TypeError, match="two strings"):
        mr.compare(a, b, labels="rollout")


def test_plot_says_no_difference_at_zero() -> None:
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    a = routes(base())
    left, _ = mr.compare(a, a).plot().axes
    texts = [t.get_text() for t in left.texts]
    assert any(t.startswith("no difference") for t in texts), texts
    assert not [p for p in left.patches if p.get_height() != 0]  # no empty bars on a ±0.04 axis
    assert list(left.get_yticks()) == []
    differing = mr.compare(a, routes(base(1))).plot().axes[0]
    assert not any("no difference" in t.get_text() for t in differing.texts)


def test_router_labels() -> None:
    from moe_replay.metrics import _router_labels

    hf = [f"model.layers.{i}.mlp.gate" for i in (1, 2, 3)]  # a dense first layer: numbers, not positions
    assert _router_labels(hf) == (["1", "2", "3"], "layer N (model.layers.N.mlp.gate)")
    mixed = ["encoder.moe.router", "decoder.moe.router"]
    assert _router_labels(mixed) == (["encoder", "decoder"], "router")
    assert _router_labels(["model.gate"]) == (["model.gate"], "router")
    assert _router_labels(["a.gate", "b.x.gate"]) == (["a", "b.x"], "router")


def test_bad_names_are_refused_not_misread() -> None:
    """A str is not split into one-letter routers; a router named twice is not counted twice."""
    a = routes(base())
    with pytest.raises(mr.ArgumentTypeError, match="list of router names"):
        mr.compare(a, a, names=NAMES[0])
    with pytest.raises(mr.ArgumentTypeError, match="list of router names"):
        mr.compare(a, a, names=3)  # type: ignore[arg-type]
    for zero_d in (np.array(3), torch.tensor(3)):  # iterable to isinstance, but one value
        with pytest.raises(mr.ArgumentTypeError, match="list of router names"):
            mr.compare(a, a, names=zero_d)  # type: ignore[arg-type]
    with pytest.raises(mr.InvalidArgumentError, match="more than once"):
        mr.compare(a, a, names=[NAMES[0], NAMES[0]])
    with pytest.raises(mr.InvalidArgumentError, match="names= is empty"):
        mr.compare(a, a, names=[])
    none = mr.Routes([], names=[], num_experts=E)
    with pytest.raises(mr.InvalidArgumentError, match="hold no router"):
        mr.compare(none, none)


def test_unvalidated_rows_are_checked_before_counting() -> None:
    """Routes(validate=False) may hold rows that are no decision: refused, not counted as one."""
    good = torch.tensor([[0, 1], [2, 3]])
    partial = mr.Routes([torch.tensor([[0, -1], [2, 3]])], names=["g"], num_experts=4, validate=False)
    with pytest.raises(mr.RoutesValidationError, match="mixes -1"):
        mr.compare(partial, mr.Routes([good], names=["g"], num_experts=4))
    repeated = mr.Routes([torch.tensor([[0, 0], [2, 3]])], names=["g"], num_experts=4, validate=False)
    with pytest.raises(mr.RoutesValidationError, match="repeats an expert"):
        mr.compare(mr.Routes([good], names=["g"], num_experts=4), repeated)  # overlap would read 100%


def test_routers_of_different_token_counts_are_named() -> None:
    """An encoder and a decoder see different tokens: the error says which routers, and names=."""
    r = mr.Routes([torch.tensor([[0, 1], [2, 3]]), torch.tensor([[0, 1]])], names=["enc", "dec"], num_experts=4)
    with pytest.raises(mr.RoutesValidationError, match=r"2 rows: \['enc'\]; 1 rows: \['dec'\].*names="):
        mr.compare(r, r)
    assert mr.compare(r, r, names=["dec"]).overall == 0.0


def test_plot_router_that_is_not_there() -> None:
    pytest.importorskip("matplotlib")
    import matplotlib
    import matplotlib.pyplot as plt

    matplotlib.use("Agg")
    c = mr.compare(routes(base()), routes(base(1)))
    figures = plt.get_fignums()
    with pytest.raises(mr.UnknownRouterError, match="no router named 'nope'"):
        c.plot(router="nope")
    with pytest.raises(mr.InvalidArgumentError, match="out of range"):
        c.plot(router=3)
    with pytest.raises(mr.ArgumentTypeError, match="router must be"):
        c.plot(router=1.0)  # type: ignore[arg-type]
    assert plt.get_fignums() == figures  # no half-drawn figure left open
    assert c.plot(router=-1).axes[1].get_title() == f"expert load, {NAMES[-1]}"
    assert c.plot(router=np.int64(0)).axes[1].get_title() == f"expert load, {NAMES[0]}"


def test_comparisons_compare_equal_by_value() -> None:
    """``==`` on two comparisons holding numpy arrays raised "truth value of an array is ambiguous"."""
    a, b = routes(base()), routes(base(1))
    assert mr.compare(a, b) == mr.compare(a, b)
    assert mr.compare(a, b) != mr.compare(a, a)
    assert mr.compare(a, b) != mr.compare(a, b, labels=("x", "y"))
    assert mr.compare(a, b) != "not a comparison"


def test_plot_of_one_router_draws_its_own_experts_only() -> None:
    """Routers of 4 and 300 experts: router 0's load panel shows 4 experts, not 300 with 296 that never exist."""
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    small = torch.tensor([[0, 1], [2, 3], [1, 2]])
    wide = torch.tensor([[0, 299], [5, 6], [7, 8]])
    a = mr.Routes([small, wide], names=["layers.0.gate", "layers.1.gate"], num_experts=[4, 300])
    b = mr.Routes([small.flip(0), wide], names=a.names, num_experts=[4, 300])
    c = mr.compare(a, b)
    own = c.plot(router=0).axes[1]
    assert len(own.patches) == 2 * 4 and own.get_xlim()[1] < 4
    assert [p.get_height() for p in own.patches[:4]] == c.load_a[0, :4].tolist()
    assert c.plot(router="layers.1.gate").axes[1].get_xlim()[1] > 299
    assert c.num_experts == (4, 300)


@pytest.mark.reliability("bad inputs")
def test_routes_of_other_tokens_are_not_compared() -> None:
    """Once silent: routes that know their tokens were compared even when recorded for other tokens."""
    a = routes(base())
    ids = torch.arange(T)
    shuffled = ids.flip(0)
    with pytest.raises(mr.RoutesValidationError, match=r"recorded for other tokens: row 0 is token 0 in a but 19"):
        mr.compare(a.with_token_ids(ids), a.with_token_ids(shuffled))
    partly = ids.clone()
    partly[:5] = -1  # unknown ids compare with anything
    assert mr.compare(a.with_token_ids(ids), a.with_token_ids(partly)).overall == 0.0
    assert mr.compare(a.with_token_ids(ids), a).overall == 0.0  # one side knows no ids: nothing to check
    assert mr.compare(a.with_token_ids(ids), a.with_token_ids(shuffled).with_token_ids(None)).overall == 0.0


def test_every_figure_matches_a_numpy_computation_on_random_routes() -> None:
    """compare() against the figures written out in numpy, on random routes with -1 rows, both modes."""
    rng = np.random.default_rng(0)
    for _ in range(12):
        t, layers, k, e = int(rng.integers(1, 40)), int(rng.integers(1, 5)), int(rng.integers(1, 4)), 8
        a = np.argsort(rng.random((t, layers, e)), axis=-1)[..., :k]
        b = np.where((rng.random((t, layers)) < 0.3)[..., None], np.argsort(rng.random((t, layers, e)), -1)[..., :k], a)
        a[rng.random((t, layers)) < 0.1] = -1
        b[rng.random((t, layers)) < 0.1] = -1
        names = [f"l.{i}.g" for i in range(layers)]
        ra, rb = (mr.Routes.from_numpy(x, names=names, num_experts=e) for x in (a, b))
        ok = ~((a < 0).all(-1) | (b < 0).all(-1))
        for mode in ("set", "slot"):
            same = (np.sort(a, -1) == np.sort(b, -1)).all(-1) if mode == "set" else (a == b).all(-1)
            d = ok & ~same
            c = mr.compare(ra, rb, mode=mode)
            assert c.differ.tolist() == d.sum(0).tolist() and c.compared.tolist() == ok.sum(0).tolist()
            assert c.excluded.tolist() == (~ok).sum(0).tolist()
            assert c.tokens == ok.any(1).sum() and c.tokens_differ == d.any(1).sum()
            assert c.differing_routers == d.sum()
            shared = [sum(len(set(a[i, j]) & set(b[i, j])) for i in range(t) if ok[i, j]) for j in range(layers)]
            assert c.shared_experts.tolist() == shared
            for side, x in ((c.load_a, a), (c.load_b, b)):
                want = [np.bincount(x[:, j][ok[:, j]].reshape(-1), minlength=e) for j in range(layers)]
                assert np.array_equal(side, np.stack(want))
            if ok.any():
                assert c.overall == pytest.approx(d.sum() / ok.sum())
                assert c.overlap == pytest.approx(sum(shared) / (ok.sum() * k))


@pytest.mark.reliability
def test_plot_and_repr_say_how_many_rows_were_not_compared() -> None:
    """Once misleading: an engine rollout with most rows -1 (prefix cache) plotted "0.00% of decisions differ"
    with no word that 15 of 20 rows per router were left out; the repr printed "nan" for one figure."""
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    a = routes(base())
    partial = [x.clone() for x in base()]
    for x in partial:
        x[:15] = -1
    c = mr.compare(a, routes(partial))
    for left in (mr.compare(a, a).plot().axes[0], mr.compare(a, routes(base(1))).plot().axes[0]):
        assert "rows not compared" not in left.get_title()  # nothing left out: nothing said
    title = c.plot().axes[0].get_title()
    assert "45 of 60 rows not compared (-1 on either side)" in title, title
    assert c.plot().axes[1].get_ylabel() == "token slots compared (all routers)"
    empty = mr.compare(mr.Routes([torch.full((T, K), -1)] * 3, names=NAMES, num_experts=E), a)
    assert "nan" not in repr(empty) and "differing routers per token:    n/a" in repr(empty)
    assert "60 of 60 rows not compared" in empty.plot().axes[0].get_title()


def test_compare_of_something_other_than_routes_says_what_to_pass() -> None:
    a = routes(base())
    model = mr.models.build("softmax_topk")
    with mr.attach(model) as session:
        with pytest.raises(mr.ArgumentTypeError, match=r"got Session and Routes: .*pass session.routes\(\)"):
            mr.compare(session, a)  # type: ignore[arg-type]
    with pytest.raises(mr.ArgumentTypeError, match=r"got Routes and Tensor: wrap index arrays with mr.Routes"):
        mr.compare(a, base()[0])  # type: ignore[arg-type]


@pytest.mark.reliability("bad inputs")
def test_rows_recorded_at_prompt_padding_are_not_compared(tmp_path: Path) -> None:
    """Once silent: two captures of one left-padded batch counted the routers' choices at the padding positions
    (the token of no sequence) as decisions: 12 tokens compared where the batch holds 10, its figures off."""
    model = mr.models.build("softmax_topk")
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    real = mask.reshape(-1).bool()
    with mr.attach(model) as session:
        with session.capture():
            model(ids, attention_mask=mask)
        before = session.routes()
        with torch.no_grad():
            model.layers[0].mlp.router.weight.add_(torch.randn(model.layers[0].mlp.router.weight.shape))
        with session.capture():
            model(ids, attention_mask=mask)
        after = session.routes()
    c = mr.compare(before, after)
    want = mr.compare(before[real].with_token_ids(None), after[real].with_token_ids(None))
    assert c.tokens == 10 and c.compared.tolist() == [10, 10] and c.excluded.tolist() == [2, 2]
    assert c.padding_rows == 4 and "excluded_rows=4 (4 at padding)" in repr(c)
    assert c.differ.tolist() == want.differ.tolist() and c.tokens_differ == want.tokens_differ
    assert np.array_equal(c.load_a, want.load_a) and np.array_equal(c.load_b, want.load_b)
    # one side knowing its padding is enough, and a file keeps it
    plain = mr.Routes(list(after.per_layer()), names=after.names, num_experts=after.experts_per_layer)
    before.save(tmp_path / "before.npz")
    assert mr.compare(mr.Routes.load(tmp_path / "before.npz"), plain) == c
    # rows at padding given an id since are still rows the routers ran on padding (with_token_ids(ids) of the padded
    # batch gives them the pad token's): not compared (they once were, as a token's, skewing every figure)
    given = mr.compare(before.with_token_ids(ids), after.with_token_ids(ids))
    assert given == c and given.padding_rows == 4


def _random_pair(
    rng: np.random.Generator, tokens: int, routers: list[tuple[int, int]]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Rows of two routings of the same tokens: b keeps a's experts (in another slot order), changes them, or -1s."""
    a, b = [], []
    for e, k in routers:
        x = np.stack([rng.permutation(e)[:k] for _ in range(tokens)]) if tokens else np.zeros((0, k), np.int64)
        y = x.copy()
        for t in range(tokens):
            roll = rng.random()
            y[t] = rng.permutation(e)[:k] if roll < 0.25 else (rng.permutation(y[t]) if roll < 0.5 else y[t])
            y[t] = -1 if rng.random() < 0.1 else y[t]
            x[t] = -1 if rng.random() < 0.1 else x[t]
        a.append(x), b.append(y)
    return a, b


@given(
    routers=st.lists(
        st.tuples(st.sampled_from([1, 2, 3, 8, 255, 256, 257]), st.integers(1, 4)), min_size=1, max_size=3
    ),
    tokens=st.sampled_from([0, 1, 2, 9]),
    seed=st.integers(0, 2**16),
)
@examples(40)
def test_figures_of_routers_of_different_sizes_match_a_hand_count(
    routers: list[tuple[int, int]], tokens: int, seed: int
) -> None:
    """Routers of 1 to 257 experts and k = 1 to 4 in one comparison, no token or one, -1 rows on either side, the
    same experts in other slots, b's routers in another order: every figure, in both modes, counted by hand."""
    routers = [(e, min(k, e)) for e, k in routers]
    rng = np.random.default_rng(seed)
    a, b = _random_pair(rng, tokens, routers)
    names = [f"model.layers.{i}.mlp.gate" for i in range(len(routers))]
    experts = [e for e, _ in routers]
    ra = mr.Routes([torch.from_numpy(x) for x in a], names=names, num_experts=experts)
    order = rng.permutation(len(names))
    rb = mr.Routes(
        [torch.from_numpy(b[i]) for i in order],
        names=[names[i] for i in order],
        num_experts=[experts[i] for i in order],
    )
    width = max(experts)
    for mode in ("set", "slot"):
        c = mr.compare(ra, rb, mode=mode)
        differ, compared, shared, seen, token_differs = [], [], [], set(), {}
        for j, (x, y) in enumerate(zip(a, b, strict=True)):
            load_a, load_b = [0] * width, [0] * width
            d = n = same = 0
            for t in range(tokens):
                if x[t][0] < 0 or y[t][0] < 0:
                    continue
                differs = set(x[t]) != set(y[t]) if mode == "set" else list(x[t]) != list(y[t])
                d, n, same = d + differs, n + 1, same + len(set(x[t]) & set(y[t]))
                seen.add(t)
                token_differs[t] = token_differs.get(t, 0) + differs
                for ex in x[t]:
                    load_a[ex] += 1
                for ex in y[t]:
                    load_b[ex] += 1
            differ.append(d), compared.append(n), shared.append(same)
            assert c.load_a[j].tolist() == load_a and c.load_b[j].tolist() == load_b
        assert c.differ.tolist() == differ and c.compared.tolist() == compared and c.shared_experts.tolist() == shared
        assert c.excluded.tolist() == [tokens - n for n in compared] and c.num_experts == tuple(experts)
        assert c.tokens == len(seen) and c.tokens_differ == sum(1 for v in token_differs.values() if v)
        assert c.differing_routers == sum(token_differs.values())
        if sum(compared):
            assert c.overall == pytest.approx(sum(differ) / sum(compared))
            assert c.overlap == pytest.approx(
                sum(shared) / sum(n * k for n, (_, k) in zip(compared, routers, strict=True))
            )
            assert c.token_fraction == pytest.approx(c.tokens_differ / len(seen))
        else:
            assert np.isnan(c.overall) and np.isnan(c.overlap) and np.isnan(c.token_fraction) and "n/a" in repr(c)


@pytest.mark.reliability("bad inputs")
def test_routes_that_do_not_fit_each_other_are_refused_both_ways() -> None:
    """Other router names, k, expert count, token count or token ids, on either side: an error, never a figure."""
    rows = torch.tensor([[0, 1], [2, 3], [1, 3]])
    a = mr.Routes([rows], names=["g"], num_experts=4)
    others = {
        "other names": mr.Routes([rows], names=["h"], num_experts=4),
        "other k": mr.Routes([rows[:, :1]], names=["g"], num_experts=4),
        "other experts": mr.Routes([rows], names=["g"], num_experts=5),
        "other tokens": mr.Routes([rows[:2]], names=["g"], num_experts=4),
        "no tokens": mr.Routes([rows[:0]], names=["g"], num_experts=4),
        "another router": mr.Routes([rows, rows], names=["g", "h"], num_experts=4),
    }
    for b in others.values():
        for x, y in ((a, b), (b, a)):
            with pytest.raises(mr.RoutesValidationError):
                mr.compare(x, y)
            tried()
    ids = a.with_token_ids(torch.tensor([5, 6, 7]))
    for x, y in ((ids, a.with_token_ids(torch.tensor([5, 7, 6]))), (a.with_token_ids(torch.tensor([9, 6, 7])), ids)):
        with pytest.raises(mr.RoutesValidationError, match="recorded for other tokens"):
            mr.compare(x, y)
        tried()


@pytest.mark.reliability("silent replays")
def test_a_sequence_first_capture_is_compared_with_an_engines_rows_token_by_token() -> None:
    """Once silent: compare() of a capture of routers that see the batch sequence-first (position 0 of every sequence
    first) with the same tokens' routes laid out sequence by sequence (an engine's, a batch layout's) compared rows
    of other tokens, and reported 75% of identical decisions as differing. Where both know their token ids the rows
    are now put in the order of their tokens (all the same); where one does not, which rows are the same tokens
    cannot be told, and that is refused."""
    from tests.test_batch import _sequence_first_captures

    captured, alone, _ = _sequence_first_captures([4, 4])
    laid_out = mr.Routes.cat(alone)  # (the same decisions, sequence by sequence)
    assert not torch.equal(captured.token_ids, laid_out.token_ids)
    assert mr.compare(captured, laid_out).overall == mr.compare(laid_out, captured).overall == 0.0
    for x, y in (
        (captured, laid_out.with_token_ids(None)),  # (an engine's rows read without their ids)
        (laid_out.with_token_ids(None), captured),
        (captured.with_token_ids(None), laid_out),
    ):
        with pytest.raises(mr.RoutesValidationError, match="sequence-first.*token ids"):
            mr.compare(x, y)
    assert mr.compare(captured, captured.with_token_ids(None)).overall == 0.0  # (one order: row by row)
    flipped = mr.Routes.cat(alone[::-1])  # (other tokens in the other order: refused by their ids)
    with pytest.raises(mr.RoutesValidationError, match="other tokens"):
        mr.compare(captured, flipped)
    tried(6)
