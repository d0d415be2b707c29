"""Defects noticed in earlier rounds and left: each shown failing on the code before its fix, then fixed (or kept
as a strict xfail that fails because of the silence it names)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import moe_replay as mr


def _captured() -> tuple[torch.nn.Module, mr.Session, mr.Routes]:
    model = mr.models.build("softmax_topk", seed=0)
    session = mr.attach(model)
    x = torch.randint(1, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    with session.capture(), torch.no_grad():
        model(x)
    return model, session, session.routes()


# --- 4. router names given as any iterable of str -----------------------------------------------------------------


def _name_takers(routes: mr.Routes) -> dict[str, Any]:
    """Public calls that take router names, each fed ``value`` in their place; each returns the names it took."""
    rows = list(routes.per_layer())
    return {
        "compare(names=)": lambda v: mr.compare(routes, routes, names=v).names,
        "Routes(names=)": lambda v: mr.Routes(rows, names=v, num_experts=routes.num_experts).names,
        "Routes.select": lambda v: routes.select(v).names,
        "Routes.from_numpy(names=)": lambda v: (
            mr.Routes.from_numpy(routes.to_numpy(), names=v, num_experts=routes.num_experts).names
        ),
        "from_megatron(names=)": lambda v: mr.interop.from_megatron(rows, names=v, num_experts=8).names,
        "LayerMap.from_names": lambda v: mr.LayerMap.from_names(v, num_layers=2, num_experts=8, top_k=2).names,
    }


@pytest.mark.reliability("bad inputs")
def test_router_names_are_taken_from_any_ordered_iterable_of_str_and_a_bare_str_is_refused() -> None:
    """``names=d.keys()`` (a dict's keys, in the dict's order) was refused as a set, though a generator of the same
    names was taken; a bare str is one router's name, never read as a list of its letters."""
    _, _, routes = _captured()
    names = tuple(routes.names)
    by_name = {n: i for i, n in enumerate(names)}
    for call, take in _name_takers(routes).items():
        for what, value in {
            "a dict's keys()": by_name.keys(),
            "a generator": (n for n in names),
            "a map object": map(str, names),
            "a tuple": names,
        }.items():
            assert tuple(take(value)) == names, f"{call} with {what}"
        with pytest.raises(mr.MoEReplayError, match=r"got one str .*pass a list") as e:
            take(names[0])
        assert "names" in str(e.value) or "select" in str(e.value), call
        with pytest.raises(mr.MoEReplayError, match="has no order"):
            take(set(names))


# --- 5. a plot shown once -------------------------------------------------------------------------------------------


def test_a_comparisons_plot_leaves_no_pyplot_figure_open_so_a_notebook_shows_it_once() -> None:
    """``plot()`` built its figure through pyplot and returned it: a notebook cell ending in ``c.plot()`` showed it
    as the cell's value and again as an open pyplot figure (and ``plt.show()`` later showed it once more)."""
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    _, _, routes = _captured()
    plt.close("all")
    c = mr.compare(routes, routes, labels=("rollout", "training"))
    figs = [c.plot(), c.plot(router=0)]
    assert plt.get_fignums() == [], "plot() left a figure open in pyplot"
    for fig in figs:
        assert isinstance(fig, Figure) and len(fig.axes) == 2
        assert fig.axes[1].get_legend_handles_labels()[1] == ["rollout", "training"]
        fig.canvas.draw()  # (it renders: a canvas of its own)
