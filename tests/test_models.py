"""The reference models: a configuration they cannot run, or an input past their positions, is refused clearly."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import moe_replay as mr


@pytest.mark.parametrize(
    ("style", "overrides", "match"),
    [
        ("softmax_topk", {"num_expert": 4}, r"\['num_expert'\], which MoEConfig has no field"),
        ("softmax_topk", {"router": "linear_gate"}, "first argument, not router='linear_gate'"),
        ("softmax_topk", {"num_experts": 4, "top_k": 8}, "more than the num_experts=4"),
        ("softmax_topk", {"top_k": 0}, "top_k must be a positive int"),
        ("topk_softmax", {"num_experts": 0}, "num_experts must be a positive int"),
        ("linear_gate", {"hidden_size": 30}, "multiple of num_heads=4"),
        ("grouped_sigmoid", {"topk_group": 8}, r"topk_group must be in 1\.\.n_group=4"),
        ("grouped_sigmoid", {"n_group": 0}, "n_group must be a positive int"),
        ("softmax_topk", {"num_layers": "2"}, "num_layers must be a non-negative int"),
        ("softmax_topk", {"first_dense_layers": 1.0}, "first_dense_layers must be a non-negative int"),
        ("softmax_topk", {"shared_expert": 1}, "shared_expert must be True or False"),
        ("softmax_topk", {"router_init_std": "0.5"}, "router_init_std must be a number"),
        ("softmax_topk", {"seed": None}, "seed must be an int"),
        ("softmax_topk", {"seed": 2**70}, "seed must be an int"),
        ("softmax_topk", {"num_layers": 0}, "num_layers must be a positive int, got 0"),
        ("softmax_topk", {"num_layers": -3}, "num_layers must be a non-negative int"),
        ("softmax_topk", {"num_layers": 2, "first_dense_layers": 2}, "leaves none of the num_layers=2 layers an MoE"),
        ("softmax_topk", {"routed_scaling_factor": float("nan")}, "routed_scaling_factor must be a finite number"),
        ("softmax_topk", {"router_init_std": float("inf")}, "router_init_std must be a finite number"),
        ("softmax_topk", {"num_layers": 10**9}, r"parameters \(.* GiB in float32\), more than the .* GiB"),
        ("linear_gate", {"hidden_size": 2**20, "num_heads": 1}, r"use smaller sizes"),
        ("top1_argmax", {"vocab_size": 10**12}, "MAX_PARAMETER_BYTES"),
    ],
)
def test_a_configuration_that_cannot_run_is_refused_at_build(style: str, overrides: dict, match: str) -> None:
    with pytest.raises(mr.InvalidArgumentError, match=match):
        mr.models.build(style, **overrides)


def test_positions_past_max_positions_are_refused() -> None:
    """Not an IndexError from the position embedding, also when generate() runs past the end."""
    model = mr.models.build("softmax_topk", max_positions=8)
    assert model(torch.zeros(1, 8, dtype=torch.long)).logits.shape == (1, 8, 128)
    with pytest.raises(mr.InvalidArgumentError, match=r"9 positions \(0 cached \+ 9 new\) exceed max_positions=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(mr.InvalidArgumentError, match=r"\(8 cached \+ 1 new\) exceed max_positions=8"):
        model.generate(torch.zeros(1, 4, dtype=torch.long), max_new_tokens=6)
    assert model.generate(torch.zeros(1, 4, dtype=torch.long), max_new_tokens=5).shape == (1, 9)


def test_a_packed_row_longer_than_max_positions_runs_and_given_positions_are_checked() -> None:
    """Once refused: a packed row restarts its positions, so a row longer than max_positions used positions
    below it and ran as before 08a3f50; explicit positions past the end were an IndexError."""
    model = mr.models.build("softmax_topk", num_layers=1, max_positions=8)
    layout = mr.BatchLayout.packed([6, 6])
    seqs = [torch.arange(6), torch.arange(6, 12)]
    with torch.no_grad():
        packed = model(layout.tokens(seqs), position_ids=layout.position_ids()).logits
        alone = model(seqs[1][None]).logits
    assert torch.allclose(packed[0, 6:], alone[0], atol=1e-5)
    for positions in ([[0, 1, 8]], [[-1, 0, 1]]):
        with pytest.raises(mr.InvalidArgumentError, match=r"position_ids hold .* outside 0\.\.7"):
            model(torch.zeros(1, 3, dtype=torch.long), position_ids=torch.tensor(positions))


@pytest.mark.parametrize("style", mr.models.STYLES)
@pytest.mark.parametrize("overrides", [{}, {"num_layers": 3, "first_dense_layers": 1, "shared_expert": True}])
def test_the_size_refused_at_build_bounds_what_the_model_holds(style: str, overrides: dict) -> None:
    """The count a build checks against the memory cap, from the sizes alone, is at least what the built model
    holds, and exceeds it by no more than the selection bias of the routers that have none."""
    model = mr.models.build(style, **overrides)
    held = sum(t.numel() for t in (*model.parameters(), *model.buffers()))
    moe_layers = model.config.num_layers - model.config.first_dense_layers
    assert held <= model.config.parameter_count() <= held + moe_layers * model.config.num_experts


@pytest.mark.reliability("bad inputs")
def test_a_build_past_the_memory_cap_is_refused_before_allocating(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once a huge ``num_layers`` started allocating layer after layer. Sizes past the cap are refused from the
    sizes alone: with the cap lowered under a default model's size, its build is refused, never constructed."""
    size = 4 * mr.models.MoEConfig().parameter_count()
    monkeypatch.setattr(mr.models, "MAX_PARAMETER_BYTES", size - 1)
    monkeypatch.setattr(mr.models.MoETransformer, "__init__", lambda *a: pytest.fail("allocated"))
    with pytest.raises(mr.InvalidArgumentError, match="more than the"):
        mr.models.build("softmax_topk")
    monkeypatch.setattr(mr.models, "MAX_PARAMETER_BYTES", size)
    with pytest.raises(pytest.fail.Exception, match="allocated"):  # (at the cap: built)
        mr.models.build("softmax_topk")


def _drawn(seed: int, make: Callable[[], torch.nn.Module]) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {name: p.detach().clone() for name, p in make().named_parameters()}


_CONFIG = {"hidden_size": 16, "num_experts": 8, "top_k": 2, "expert_size": 12}


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("style", mr.models.STYLES)
@pytest.mark.parametrize("part", ["block", "router", "experts", "transformer"])
def test_a_module_built_alone_draws_its_parameters_as_nn_linear_does(style: str, part: str) -> None:
    """Built outside build(), a block, its router and its experts draw their parameters from the global generator at
    construction, as nn.Linear does: finite, seeded, within nn.Linear's bound. They were left uninitialised
    (torch.empty): values, NaN now and then, made of whatever memory earlier work left."""
    cfg = mr.models.MoEConfig(router=style, **_CONFIG)
    makers: dict[str, Callable[[], torch.nn.Module]] = {
        "block": lambda: mr.models.MoEBlock(cfg),
        "router": lambda: mr.models.MoEBlock(cfg).get_submodule("gate" if style == "linear_gate" else "router"),
        "experts": lambda: mr.models.Experts(cfg),
        "transformer": lambda: mr.models.MoETransformer(mr.models.MoEConfig(router=style, num_layers=1, **_CONFIG)),
    }
    poison = torch.full((1 << 16,), float("nan"))  # (memory that held NaN, freed: an empty tensor may reuse it)
    del poison
    first, again, other = _drawn(0, makers[part]), _drawn(0, makers[part]), _drawn(1, makers[part])
    assert first.keys() == again.keys() == other.keys()
    for name, p in first.items():
        assert torch.isfinite(p).all(), name
        assert torch.equal(p, again[name]), "the same seed must give the same parameters"
        if p.dim() >= 2 and not name.startswith(("embed.", "pos.")):  # (a drawn weight: not a norm's, an embedding's)
            r = other[name]
            assert not torch.equal(p, r), "another seed must give other parameters"
            fan_in = p.shape[-1]
            assert p.abs().max() <= 1 / fan_in**0.5, "drawn as nn.Linear draws its weight"
            assert p.std() > 0.2 / fan_in**0.5


def test_build_draws_every_parameter_from_its_seed_alone() -> None:
    """build(seed=...) gives the same weights whatever the global generator's state, and other weights for another
    seed: the modules' own draw at construction changes nothing of what build promises, nor the global stream it
    leaves (build draws its parameters from its own generator)."""
    torch.manual_seed(1)
    a = mr.models.build("grouped_sigmoid", num_layers=1, **_CONFIG)
    after_a = torch.get_rng_state()
    torch.manual_seed(2)
    b = mr.models.build("grouped_sigmoid", num_layers=1, **_CONFIG)
    c = mr.models.build("grouped_sigmoid", num_layers=1, seed=3, **_CONFIG)
    for (name, p), q, r in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
        if not name.endswith("norm.weight"):
            assert not torch.equal(p, r), name
    torch.manual_seed(1)  # the global stream build leaves: as many draws as its nn.Linear and nn.Embedding make
    expected = _linear_draws(a)
    assert torch.equal(after_a, expected)


def _linear_draws(model: torch.nn.Module) -> torch.Tensor:
    """The global generator's state after drawing what torch's own modules of ``model`` draw at construction."""
    for m in model.modules():
        if isinstance(m, torch.nn.Linear | torch.nn.Embedding):
            m.reset_parameters()
    return torch.get_rng_state()
