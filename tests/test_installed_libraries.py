"""The routers of installed public MoE libraries, with zero configuration (their own code, not a copy).

The ``test_public_routers*`` files re-write upstream routers by hand; these tests attach to the classes that the
libraries themselves ship, where they are installed (each test skips when its library is not). Nothing here changes
a library's code: which experts each token went to is read from the library's own tensors (a dispatch mask its gate
returns) or from the rows its expert modules were fed. The rule checked: a replay is proven exact (the experts each
token was dispatched to are among those its recorded row names, a replay after the routers change dispatches every
token as the capture did, where a free forward would not, and its output and gradients are those of the same
forward with the recorded experts forced by hand: the decision calls of the library's code answered with the
recorded rows by patching ``torch.topk``/``torch.argmax``, which never calls moe_replay), or it is refused with a
``MoEReplayError`` that says why, the model left as it was.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from torch import nn

import moe_replay as mr
from tests.conftest import snapshot
from tests.test_public_routers9 import _wrappers

D, E = 16, 4

Dispatch = Callable[[], list[torch.Tensor]]


# ----------------------------------------------------------------------- forcing by hand, without moe_replay
@contextlib.contextmanager
def _forced_by_hand(calls: list[torch.Tensor], width: int) -> Iterator[None]:
    """The decision calls of the code run in the block (``torch.topk``/``Tensor.topk``/``torch.argmax``/
    ``Tensor.argmax``/``torch.max``/``Tensor.max`` along the last dimension of a tensor ``width`` wide) answer, in
    call order, the index tensors of ``calls`` (one per call, ``[tokens, k]``), with the input's values at those
    indices. Other calls (a top-k over tokens for a capacity, a ``max`` of two tensors or of all) run as they
    are."""
    queue = list(calls)
    real_topk, real_argmax, real_max = torch.topk, torch.argmax, torch.max

    def _along_experts(t: torch.Tensor, dim: int | None) -> bool:
        return dim is not None and t.dim() >= 1 and dim in (-1, t.dim() - 1) and t.shape[-1] == width

    def topk(t: torch.Tensor, k: int, dim: int = -1, largest: bool = True, sorted: bool = True) -> Any:
        if not _along_experts(t, dim) or not largest:
            return real_topk(t, k, dim=dim, largest=largest, sorted=sorted)
        idx = queue.pop(0).long().reshape(*t.shape[:-1], -1)
        assert idx.shape[-1] == k, (idx.shape, k)
        return torch.return_types.topk((t.gather(-1, idx), idx))

    def argmax(t: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
        if not _along_experts(t, dim):
            return real_argmax(t, dim=dim, keepdim=keepdim)
        idx = queue.pop(0).long().reshape(*t.shape[:-1], 1)
        return idx if keepdim else idx.squeeze(-1)

    def max_(t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        dim = kwargs.get("dim", args[0] if args else None)
        if not isinstance(dim, int) or not _along_experts(t, dim):
            return real_max(t, *args, **kwargs)
        keepdim = bool(kwargs.get("keepdim", args[1] if len(args) > 1 else False))
        idx = queue.pop(0).long().reshape(*t.shape[:-1], 1)
        values = t.gather(-1, idx)
        if not keepdim:
            values, idx = values.squeeze(-1), idx.squeeze(-1)
        return torch.return_types.max((values, idx))

    with (
        mock.patch.object(torch, "topk", topk),
        mock.patch.object(torch.Tensor, "topk", topk),
        mock.patch.object(torch, "argmax", argmax),
        mock.patch.object(torch.Tensor, "argmax", argmax),
        mock.patch.object(torch, "max", max_),
        mock.patch.object(torch.Tensor, "max", max_),
    ):
        yield
    assert not queue, f"{len(queue)} forced decision calls were not made"


def _columns(rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """A top-2 made of two top-1 calls: one call per column of each router's rows."""
    return [r[:, j : j + 1] for r in rows for j in range(r.shape[1])]


def _dense(rows: torch.Tensor, width: int) -> torch.Tensor:
    return torch.zeros(rows.shape[0], width, dtype=torch.bool).scatter_(1, rows.long(), True)


def _perturb(model: nn.Module, keep: Callable[[str], bool], scale: float) -> None:
    """Noise on every parameter that is no expert's (the routers', and whatever else feeds them): of a scale that
    moves the choices but keeps every chosen expert's weight off zero (a gate that dispatches by ``weight != 0``,
    as GShard's, rightly refuses routes whose experts it would skip)."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not keep(name):
                p.add_(scale * torch.randn(p.shape, generator=g))


# ----------------------------------------------------------------------- reading which experts each token went to
def _from_gate(gates: list[nn.Module], mask_at: int) -> tuple[Dispatch, Callable[[], None]]:
    """The dispatch each gate returned in its last forward (the library's own ``[..., tokens, E, capacity]`` mask,
    output ``mask_at``) as ``[tokens, E]`` booleans; and a function that takes the hooks off."""
    last: dict[int, torch.Tensor] = {}

    def hook(i: int) -> Callable[..., None]:
        def read(_m: nn.Module, _a: object, out: tuple[torch.Tensor, ...]) -> None:
            mask = out[mask_at].detach()
            last[i] = mask.ne(0).any(-1).reshape(-1, mask.shape[-2])

        return read

    handles = [g.register_forward_hook(hook(i)) for i, g in enumerate(gates)]
    return (lambda: [last[i].clone() for i in range(len(gates))]), lambda: [h.remove() for h in handles]  # type: ignore[func-returns-value]


def _from_experts(
    blocks: list[tuple[nn.Module, list[nn.Module]]], fed_from: list[nn.Module] | None = None
) -> tuple[Dispatch, Callable[[], None]]:
    """Which tokens each block's expert modules were fed in its last forward, matched to the block's input rows (or
    to the output rows of its module in ``fed_from``, where the experts take a projection of the input)."""
    inputs: dict[int, torch.Tensor] = {}
    fed: dict[int, list[torch.Tensor]] = {}
    handles = []

    def block_hook(i: int, n: int) -> Callable[..., None]:
        def read(_m: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor | None = None) -> None:
            x = (args[0] if out is None else out).detach()
            inputs[i] = x.reshape(-1, x.shape[-1])
            fed[i] = [torch.zeros(0, x.shape[-1]) for _ in range(n)]

        return read

    def expert_hook(i: int, e: int) -> Callable[..., None]:
        def read(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach()
            fed[i][e] = torch.cat([fed[i][e], x.reshape(-1, x.shape[-1])])

        return read

    for i, (block, experts) in enumerate(blocks):
        if fed_from is None:
            handles.append(block.register_forward_pre_hook(block_hook(i, len(experts))))
        else:
            handles.append(fed_from[i].register_forward_hook(block_hook(i, len(experts))))
        handles += [ex.register_forward_pre_hook(expert_hook(i, e)) for e, ex in enumerate(experts)]

    def dispatch() -> list[torch.Tensor]:
        out = []
        for i in range(len(blocks)):
            x = inputs[i]
            out.append(torch.stack([(f[:, None, :] == x[None]).all(-1).any(0) for f in fed[i]], dim=-1))
        return out

    return dispatch, lambda: [h.remove() for h in handles]  # type: ignore[func-returns-value]


def _from_route_ids(gates: list[nn.Module], ids_at: int, k_first: bool = True) -> tuple[Dispatch, Callable[[], None]]:
    """The experts each gate's last forward dispatched each token to, from the ``[k, tokens]`` (or, not ``k_first``,
    ``[..., tokens, k]``) expert ids it returned (output ``ids_at``; ``-1`` for a route evicted over capacity), as
    ``[tokens, E]`` booleans."""
    last: dict[int, torch.Tensor] = {}

    def hook(i: int) -> Callable[..., None]:
        def read(_m: nn.Module, _a: object, out: tuple[torch.Tensor, ...]) -> None:
            ids = out[ids_at].detach().long()
            ids = ids.t() if k_first else ids.reshape(-1, ids.shape[-1])
            kept = torch.zeros(ids.shape[0], E + 1, dtype=torch.bool).scatter_(1, ids.clamp(min=-1) % (E + 1), True)
            last[i] = kept[:, :E]

        return read

    handles = [g.register_forward_hook(hook(i)) for i, g in enumerate(gates)]
    return (lambda: [last[i].clone() for i in range(len(gates))]), lambda: [h.remove() for h in handles]  # type: ignore[func-returns-value]


def _gates_of(
    mask_at: int, gate: Callable[[nn.Module], nn.Module] = lambda layer: layer.gate
) -> Callable[[nn.Module], tuple[Dispatch, Callable[[], None]]]:
    return lambda model: _from_gate([gate(layer) for layer in model.layers], mask_at)


def _experts_of(model: nn.Module) -> tuple[Dispatch, Callable[[], None]]:
    return _from_experts([(layer, list(layer.experts)) for layer in model.layers])


# ----------------------------------------------------------------------- the check
def _assert_exact(
    make: Callable[[], nn.Module],
    x: torch.Tensor,
    *,
    reader: Callable[[nn.Module], tuple[Dispatch, Callable[[], None]]],
    routers: int,
    calls: Callable[[list[torch.Tensor]], list[torch.Tensor]] = lambda rows: rows,
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] = lambda m, x: m(x),
    is_expert: Callable[[str], bool] = lambda name: "experts" in name,
    change: float = 0.5,
    train: bool = False,
) -> None:
    """Capture, then replay after the routers change, against the recorded experts forced by hand on a copy never
    attached (built again by ``make``, with the model's state), the same seed before each pair of forwards compared
    (the libraries' noise drawn alike)."""
    model, ref = make(), make()
    ref.load_state_dict(model.state_dict())
    model.train(train)
    ref.train(train)
    dispatch, remove = reader(model)
    free, remove_free = reader(ref)
    try:
        with mr.attach(model) as session:
            assert len(session.names) == routers, session.names
            torch.manual_seed(3)
            with session.capture():
                captured = forward(model, x)
            went = dispatch()
            routes = session.routes()
            rows = [routes.layer(name) for name in session.names]
            for name, r, d in zip(session.names, rows, went, strict=True):
                assert d.shape[0] == r.shape[0], (name, d.shape, r.shape)
                assert not (d & ~_dense(r, d.shape[-1])).any(), f"'{name}': a token went to an expert no row names"
            torch.manual_seed(3)
            with torch.no_grad(), _forced_by_hand(calls(rows), E):
                assert torch.equal(forward(ref, x), captured.detach()), "the rows forced by hand are not the capture"
            _perturb(model, is_expert, change)
            _perturb(ref, is_expert, change)
            torch.manual_seed(4)
            with _forced_by_hand(calls(rows), E):
                expected = forward(ref, x)
                expected.square().sum().backward()
            torch.manual_seed(4)
            with torch.no_grad():
                forward(ref, x)
            assert any(not torch.equal(a, b) for a, b in zip(free(), went, strict=True)), (
                "the changed routers dispatch as recorded anyway: the case tries nothing"
            )
            torch.manual_seed(4)
            with session.replay(routes):
                replayed = forward(model, x)
            for name, a, b in zip(session.names, dispatch(), went, strict=True):
                assert torch.equal(a, b), f"'{name}': the replay did not dispatch the tokens as recorded"
            replayed.square().sum().backward()
            assert torch.equal(replayed.detach(), expected.detach()), "the replay is not the rows forced by hand"
            want = dict(ref.named_parameters())
            for name, p in model.named_parameters():
                assert (p.grad is None) == (want[name].grad is None), name
                assert p.grad is None or torch.equal(p.grad, want[name].grad), name
    finally:
        remove()
        remove_free()


def _assert_refused(
    model: nn.Module,
    x: torch.Tensor,
    match: str,
    *,
    error: type[mr.MoEReplayError] = mr.MoEReplayError,
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] = lambda m, x: m(x),
    train: bool = False,
) -> None:
    """Refused at attach or at the first capture, saying ``match``, the model as it was."""
    model.train(train)
    before, wrappers = snapshot(model), _wrappers(model)
    with pytest.raises(error, match=match):
        with mr.attach(model) as session:
            with torch.no_grad(), session.capture():
                forward(model, x)
    assert _wrappers(model) == wrappers
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


class _Expert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.w(x))


class _Stack(nn.Module):
    """A library's MoE layers (one: each probe of a router costs a few hundred of its forwards) with residuals;
    ``out`` picks the hidden states from what a layer returns."""

    def __init__(
        self, make: Callable[[], nn.Module], out: Callable[[Any], torch.Tensor] = lambda y: y, layers: int = 1
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList([make() for _ in range(layers)])
        self.out = out

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        for layer in self.layers:
            x = x + self.out(layer(x, **kwargs))
        return x


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, D, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def _one_process_group() -> Iterator[None]:
    """A process group of one (gloo), for the libraries whose MoE layers all-to-all over one."""
    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


# ----------------------------------------------------------------------- mistral-inference: MoeLayer
@pytest.mark.reliability("silent replays")
def test_mistral_inference_moe_layer_replays_exactly() -> None:
    """mistral-inference ``MoeLayer``: a bare ``gate`` Linear, the ``topk`` of its logits in the block, softmax of
    the chosen: found as the gate, exact."""
    moe = pytest.importorskip("mistral_inference.moe")
    torch.manual_seed(0)

    def make() -> nn.Module:
        return _Stack(
            lambda: moe.MoeLayer([_Expert() for _ in range(E)], nn.Linear(D, E, bias=False), moe.MoeArgs(E, 2))
        )

    _assert_exact(make, _x(24), reader=_experts_of, routers=1)


# ----------------------------------------------------------------------- fairscale: MOELayer + Top2Gate
@pytest.mark.reliability("silent replays")
def test_fairscale_top2_gate_replays_exactly(_one_process_group: None) -> None:
    """fairscale ``MOELayer`` with ``Top2Gate`` (GShard): ``argmax`` of the softmax, a second ``argmax`` of the
    Gumbel-noised logits with the first masked (noise in every mode), capacity ``2S/E`` by token order: exact in
    training, the same tokens dropped over capacity as in the capture."""
    fs = pytest.importorskip("fairscale.nn.moe")

    def make() -> nn.Module:
        return _Stack(lambda: fs.MOELayer(fs.Top2Gate(D, E), nn.ModuleList([_Expert() for _ in range(E)])))

    _assert_exact(make, _x(4, 4), reader=_gates_of(2), routers=1, calls=_columns, train=True)


# ----------------------------------------------------------------------- lucidrains mixture-of-experts
def _lucidrains_moe(**options: object) -> nn.Module:
    lib = pytest.importorskip("mixture_of_experts")
    torch.manual_seed(0)
    return _Stack(lambda: lib.MoE(D, num_experts=E, hidden_dim=8, **options), out=lambda y: y[0])


@pytest.mark.reliability("silent replays")
def test_lucidrains_mixture_of_experts_with_every_second_expert_replays_exactly() -> None:
    """lucidrains ``mixture-of-experts`` ``MoE`` with ``second_policy_train='all'``, in training: two ``topk(k=1)``
    calls (the second over the scores with the first zeroed), capacity by position (a capacity of 4 for 24 routes
    over 4 experts: tokens are dropped): exact, the same ones dropped as in the capture."""
    _assert_exact(
        lambda: _lucidrains_moe(second_policy_train="all"),
        _x(2, 12),
        reader=_gates_of(0),
        routers=1,
        calls=_columns,
        train=True,
    )


@pytest.mark.reliability("silent replays")
def test_lucidrains_mixture_of_experts_random_second_expert_is_refused() -> None:
    """Its default ``second_policy='random'`` keeps the second expert with a probability of its current weight:
    a later choice the decision does not hold, refused."""
    model = _lucidrains_moe()
    _assert_refused(model, _x(2, 12), "chooses again from the current scores", train=True)


@pytest.mark.reliability("silent replays")
def test_lucidrains_hierarchical_moe_inner_router_is_refused() -> None:
    """Its ``HeirarchicalMoE``: ``gate_outer`` picks a group of experts, ``gate_inner`` (a ``[outer, D, inner]``
    weight, not found) an expert of it, over one ``[outer, inner, ...]`` grid of experts. The inner router is
    refused as a decision outside every attached router, never left free under a replay of the outer one."""
    lib = pytest.importorskip("mixture_of_experts")
    torch.manual_seed(0)
    model = _Stack(
        lambda: lib.HeirarchicalMoE(D, num_experts=(2, E), hidden_dim=8, second_policy_eval="all"), out=lambda y: y[0]
    )
    _assert_refused(model, _x(2, 12), r"'layers\.0\.gate_inner' \(Top2Gating\): topk over 4")


# ----------------------------------------------------------------------- st-moe-pytorch
def _st_moe(**options: object) -> nn.Module:
    lib = pytest.importorskip("st_moe_pytorch")
    torch.manual_seed(0)
    return _Stack(lambda: lib.MoE(dim=D, num_experts=E, gating_top_n=2, **options), out=lambda y: y.outputs)


@pytest.mark.reliability("silent replays")
def test_st_moe_pytorch_with_every_second_expert_replays_exactly() -> None:
    """lucidrains ``st-moe-pytorch`` ``MoE`` (ST-MoE) with thresholds that keep every chosen expert: one ``topk``
    of the (Gumbel-noised, in training with ``noise_gates``) softmax, capacity by position: exact."""
    _assert_exact(
        lambda: _st_moe(threshold_train=1e-9, threshold_eval=1e-9),
        _x(1, 8),
        reader=_gates_of(0),
        routers=1,
        forward=lambda m, x: m(x, noise_gates=True),
        change=0.1,
        train=True,
    )


@pytest.mark.reliability("silent replays")
def test_st_moe_pytorch_random_second_expert_is_refused() -> None:
    """Its default thresholds route the second expert with a probability of its current weight: refused."""
    _assert_refused(_st_moe(), _x(2, 8), "chooses again from the current scores")


# ----------------------------------------------------------------------- soft-moe-pytorch: no discrete decision
@pytest.mark.reliability("silent replays")
def test_soft_moe_pytorch_has_no_router_to_replay() -> None:
    """lucidrains ``soft-moe-pytorch`` ``SoftMoE``: every token weighs into every slot, no choice to record: no
    router found, never a replay."""
    lib = pytest.importorskip("soft_moe_pytorch")
    torch.manual_seed(0)
    model = _Stack(lambda: lib.SoftMoE(dim=D, seq_len=8, num_experts=E))
    _assert_refused(model, _x(2, 8), "no MoE router found", error=mr.RouterNotFoundError)


# ----------------------------------------------------------------------- litgpt: LLaMAMoE
def _litgpt_moe(**options: object) -> nn.Module:
    lit = pytest.importorskip("litgpt.model")
    config = pytest.importorskip("litgpt.config").Config(
        n_embd=D, n_head=2, n_layer=1, padded_vocab_size=32, n_expert=E, n_expert_per_token=2,
        moe_intermediate_size=8, intermediate_size=8, mlp_class_name="LLaMAMoE", **options,
    )  # fmt: skip
    torch.manual_seed(0)
    model = _Stack(lambda: lit.LLaMAMoE(config))
    for layer in model.layers:
        for p in layer.gate.parameters():
            nn.init.normal_(p, std=0.5)
    return model


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    "options",
    [{}, {"n_expert_groups": 2, "n_topk_groups": 1, "n_topk_scores_per_group": 1, "norm_topk_prob": True}],
    ids=["mixtral-gate", "grouped-topk-router"],
)
def test_litgpt_llama_moe_replays_exactly(options: dict[str, object]) -> None:
    """litgpt ``LLaMAMoE``: a bare ``gate`` Linear with the ``topk`` in the block (Mixtral), or its
    ``GroupedTopkRouter`` (DeepSeek-V3: sigmoid, bias, a group top-k, the scores of the other groups zeroed):
    exact."""
    _assert_exact(lambda: _litgpt_moe(**options), _x(2, 12), reader=_experts_of, routers=1)


# ----------------------------------------------------------------------- DeepSpeed: MoE, TopKGate
def _deepspeed_moe(**options: object) -> nn.Module:
    pytest.importorskip("deepspeed")
    layer = pytest.importorskip("deepspeed.moe.layer")
    torch.manual_seed(0)
    return _Stack(lambda: layer.MoE(D, _Expert(), num_experts=E, ep_size=1, min_capacity=0, **options), lambda y: y[0])


DEEPSPEED_EXACT: dict[str, tuple[dict[str, object], bool]] = {
    # name: (MoE options, train)
    "top1-jitter-capacity-by-position-train": ({"k": 1, "noisy_gate_policy": "Jitter", "use_rts": False}, True),
    "top2-residual": ({"k": 2, "use_residual": True}, False),
    "top1-rsample-train": ({"k": 1, "noisy_gate_policy": "RSample", "use_rts": False}, True),
    "top2-capacity-train": ({"k": 2, "capacity_factor": 0.5}, True),
    "top3-no-drop": ({"k": 3, "drop_tokens": False}, False),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(DEEPSPEED_EXACT))
def test_deepspeed_moe_replays_exactly(_one_process_group: None, case: str) -> None:
    """DeepSpeed ``MoE`` (``TopKGate``): top-1 by ``argmax`` (of Gumbel-noised logits with ``RSample``, of a
    jittered input with ``Jitter``), top-2 by two ``argmax`` calls (the second over Gumbel-noised logits), top-k by
    ``topk``, tokens dropped over capacity by position, the residual MoE's coefficient beside the gate: exact, the
    same tokens dropped as in the capture."""
    options, train = DEEPSPEED_EXACT[case]
    k = int(options["k"])  # type: ignore[call-overload]
    _assert_exact(
        lambda: _deepspeed_moe(**options),
        _x(2, 8),
        reader=lambda m: _from_route_ids([layer.deepspeed_moe.gate for layer in m.layers], ids_at=3),
        routers=1,
        calls=_columns if k < 3 else (lambda rows: rows),
        train=train,
    )


DEEPSPEED_REFUSED: dict[str, tuple[dict[str, object], bool, str]] = {
    "top1-random-token-selection": ({"k": 1}, False, "draws from the random stream and chooses again"),
    "top3-capacity-by-score": ({"k": 3}, False, "chooses again from the current scores"),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(DEEPSPEED_REFUSED))
def test_deepspeed_moe_later_choices_are_refused(_one_process_group: None, case: str) -> None:
    """DeepSpeed's random token selection (tokens kept over capacity by a random priority) and its top-k capacity
    kept by the current weights (``drop_policy='probs'``): later choices a replay cannot hold, refused."""
    options, train, match = DEEPSPEED_REFUSED[case]
    _assert_refused(_deepspeed_moe(**options), _x(2, 8), match, train=train)


# ----------------------------------------------------------------------- x-transformers: a dense model
@pytest.mark.reliability("silent replays")
def test_a_dense_x_transformers_model_has_no_router() -> None:
    """x-transformers ships no MoE layer (only a router z-loss): a dense decoder of it has no router, and nothing
    in it (attention's softmax, its top-k-free code) is taken for one."""
    xt = pytest.importorskip("x_transformers")
    torch.manual_seed(0)
    model = xt.TransformerWrapper(num_tokens=32, max_seq_len=8, attn_layers=xt.Decoder(dim=D, depth=2, heads=2))
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(1))
    _assert_refused(model, ids, "no MoE router found", error=mr.RouterNotFoundError)


# ----------------------------------------------------------------------- torchtitan: MoE, TokenChoiceTopKRouter
def _torchtitan_moe(bias: bool = False, **router: Any) -> nn.Module:
    """torchtitan's ``MoE`` (needs triton to import, as its expert-parallel kernels do), its weights drawn (its
    ``init_weights`` leaves them to a trainer), a load-balancing ``expert_bias_E`` drawn too where ``bias``."""
    moe = pytest.importorskip("torchtitan.models.common.moe")
    linear = pytest.importorskip("torchtitan.models.common.linear")
    k = router.setdefault("top_k", 2)

    def make() -> nn.Module:
        config = moe.MoE.Config(
            num_experts=E,
            load_balance_coeff=1e-3 if bias else None,
            routed_experts=moe.RoutedExperts.Config(
                inner_experts=moe.GroupedExperts.Config(dim=D, hidden_dim=8, num_experts=E),
                token_dispatcher=moe.LocalTokenDispatcher.Config(num_experts=E, top_k=k),
            ),
            router=moe.TokenChoiceTopKRouter.Config(
                num_experts=E, gate=linear.Linear.Config(in_features=D, out_features=E), **router
            ),
        )
        layer = config.build()
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            if bias:
                layer.expert_bias_E.copy_(0.5 * torch.randn(E, generator=g))
        return layer

    return _Stack(make)


TORCHTITAN_EXACT: dict[str, dict[str, Any]] = {
    "softmax": {"score_func": "softmax"},
    "sigmoid-normalised-scaled": {"score_func": "sigmoid", "route_norm": True, "route_scale": 2.0},
    "load-balancing-bias": {"bias": True, "route_norm": True},
    "node-limited-groups-with-bias": {"bias": True, "num_expert_groups": 2, "num_limited_groups": 1, "top_k": 1},
    # (k = 2 of one group's 2 experts: the recorded experts of another group are forced, their weights gathered)
    "node-limited-groups-whole-group": {"bias": True, "num_expert_groups": 2, "num_limited_groups": 1, "change": 2.0},
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(TORCHTITAN_EXACT))
def test_torchtitan_token_choice_router_replays_exactly(case: str) -> None:
    """torchtitan ``MoE`` with its ``TokenChoiceTopKRouter``: one ``topk`` (``sorted=False``) of the softmax or
    sigmoid scores, plus the load-balancing bias where set (the weights gathered from the scores without it), over
    the groups a node-limited top-k keeps (the others ``-inf``), in training (its expert counts updated):
    exact."""
    options = dict(TORCHTITAN_EXACT[case])
    change = float(options.pop("change", 0.5))
    _assert_exact(
        lambda: _torchtitan_moe(**options),
        _x(2, 6),
        reader=lambda m: _from_route_ids([layer.router for layer in m.layers], ids_at=1, k_first=False),
        routers=1,
        change=change,
        train=True,
    )


@pytest.mark.reliability("silent replays")
def test_torchtitan_round_robin_debug_routing_is_refused() -> None:
    """Its ``_debug_force_load_balance`` takes the ``topk`` and then routes round-robin, whatever it chose: the
    top-k decides nothing, so a capture of it would record experts no token went to. Refused."""
    model = _torchtitan_moe(_debug_force_load_balance=True)
    _assert_refused(model, _x(2, 6), "no decision-like call in its forward changes the output")


# ----------------------------------------------------------------------- latent-moe: LatentMoE
@pytest.mark.reliability("silent replays")
def test_latent_moe_replays_exactly() -> None:
    """``latent-moe`` ``LatentMoE``: a bare ``router`` Linear over the full width, the ``topk`` of its softmax in
    the block, the experts fed a down-projection of the tokens (rows matched there), a shared expert and a
    balancing loss from the chosen ids: found as the router, exact."""
    lib = pytest.importorskip("latent_moe.main")

    def make() -> nn.Module:
        torch.manual_seed(0)
        config = lib.LatentMoEConfig(d=D, m=8, n_experts=E // 2, top_k=1, alpha=2, n_shared=1, device="cpu")
        return _Stack(lambda: lib.LatentMoE(config))

    _assert_exact(
        make,
        _x(2, 6),
        reader=lambda m: _from_experts(
            [(layer, list(layer.experts)) for layer in m.layers], fed_from=[layer.w_down for layer in m.layers]
        ),
        routers=1,
        is_expert=lambda name: ".experts." in name,
    )


# ----------------------------------------------------------------------- choices among keys or tokens
class _Gated(nn.Module):
    """A Mixtral-style block of our own (bare ``gate``, ``topk`` of the softmax in the block) beside a library's
    layer, over ``[batch, seq, d]``."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(_Expert() for _ in range(E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, D)
        w, idx = torch.topk(self.gate(flat).softmax(-1), 2, dim=-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(idx == e)
            out = out.index_add(0, token, w[token, slot, None] * expert(flat[token]))
        return out.view_as(x)


class _Beside(nn.Module):
    """A found router's layer, then a library's layer (``table``) that no discovery finds."""

    def __init__(self, make: Callable[[], nn.Module]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.moe = _Gated()
        self.table = make()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.moe(x)
        return x + self.table(x)


def _peer() -> nn.Module:
    return pytest.importorskip("PEER_pytorch").PEER(D, heads=2, num_experts=16, num_experts_per_head=2, dim_key=8)


def _peer_lora() -> nn.Module:
    return pytest.importorskip("PEER_pytorch").PEERLora(D, heads=2, num_experts=16, num_experts_per_head=2, dim_key=8)


def _pkm(**options: Any) -> nn.Module:
    return pytest.importorskip("product_key_memory").PKM(D, heads=2, num_keys=8, topk=4, dim_head=8, **options)


def _colt5_ff() -> nn.Module:
    lib = pytest.importorskip("colt5_attention")
    return lib.ConditionalRoutedFeedForward(dim=D, num_heavy_tokens=4, light_ff_mult=1, heavy_ff_mult=1)


def _colt5_attention() -> nn.Module:
    lib = pytest.importorskip("colt5_attention")
    return lib.ConditionalRoutedAttention(
        dim=D, num_heavy_tokens_q=4, num_heavy_tokens_kv=4, light_dim_head=8, light_heads=2, light_window_size=4,
        heavy_dim_head=8, heavy_heads=2, use_triton=False,
    )  # fmt: skip


def _mixture_of_attention() -> nn.Module:
    lib = pytest.importorskip("mixture_of_attention")
    return lib.MixtureOfAttention(
        dim=D, num_routed_queries=4, num_routed_key_values=4, num_experts=3, dim_head=8, heads=2, use_triton=False,
        flash_attn=False,
    )  # fmt: skip


NO_ROUTER: dict[str, Callable[[], nn.Module]] = {
    "peer-product-keys": _peer,
    "peer-lora": _peer_lora,
    "product-key-memory": _pkm,
    "product-key-memory-differentiable-topk": lambda: _pkm(differentiable_topk=True),
    "colt5-routed-feedforward": _colt5_ff,
    "colt5-routed-attention": _colt5_attention,
    "mixture-of-attention": _mixture_of_attention,
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(NO_ROUTER))
def test_choices_among_keys_or_tokens_are_not_taken_for_routers(case: str) -> None:
    """PEER-pytorch's ``PEER`` and product-key-memory's ``PKM`` (a top-k over each half's keys, then over the sums:
    rows of a table), CoLT5-attention's routed feedforward and attention and mixture-of-attention (a top-k over
    the tokens, after a coordinate descent): nothing found, never a replay."""
    make = NO_ROUTER[case]
    _assert_refused(_Stack(make), _x(2, 8), "no MoE router found", error=mr.RouterNotFoundError)


@pytest.mark.reliability("silent replays")
def test_installed_peer_named_is_refused() -> None:
    """PEER named with ``include=``: its chained top-k calls (per half, then over the sums) cannot be forced by one
    gather: refused."""
    model = _Stack(_peer)
    before, wrappers = snapshot(model), _wrappers(model)
    with pytest.raises(mr.UnsupportedRouterError, match="more than one independent choice"):
        with mr.attach(model, include="layers.*") as session, torch.no_grad(), session.capture():
            model(_x(2, 8))
    assert _wrappers(model) == wrappers
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    "case", ["peer-product-keys", "peer-lora", "product-key-memory", "product-key-memory-differentiable-topk"]
)
def test_installed_product_key_layer_beside_a_found_router_is_refused(case: str) -> None:
    """PEER (its experts' rows, or LoRA rows added to a feedforward's weights) or a product-key memory (its top-k
    a plain one or CoLT5's coordinate descent) beside a found router: the rows its keys pick would be neither
    recorded nor forced by a replay of the router: the capture is refused, naming the layer."""
    make = NO_ROUTER[case]
    match = r"'table' \((PEER|PEERLora|PKM)\): topk over \d+ .* rows of the weight 'table\."
    _assert_refused(_Beside(make), _x(2, 8), match)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", ["colt5-routed-feedforward", "colt5-routed-attention"])
def test_colt5_heavy_tokens_beside_a_found_router_replay_exactly(case: str) -> None:
    """CoLT5's heavy tokens (a choice among tokens for one heavy branch, no experts) beside a found router: left
    native, the router's replay exact."""
    make = NO_ROUTER[case]
    _assert_exact(
        lambda: _Beside(make),
        _x(2, 8),
        reader=lambda m: _from_experts([(m.moe, list(m.moe.experts))]),
        routers=1,
        is_expert=lambda name: "moe.experts" in name,
        train=True,
    )


@pytest.mark.reliability("silent replays")
def test_mixture_of_attention_beside_a_found_router_is_refused() -> None:
    """Once silent: mixture-of-attention's ``MixtureOfAttention``: each of 3 attention experts (groups of one grouped
    convolution) takes its top tokens by a coordinate descent: expert choice, which a replay of the found router
    leaves free. Beside a found router it is refused, as expert choice in a feedforward layer is, naming the grouped
    convolution whose groups are the experts."""
    _assert_refused(
        _Beside(_mixture_of_attention),
        _x(2, 8),
        r"'table\.query_router' \(CoordinateDescentRouter\): topk along the tokens for each of 3 experts "
        r".*'table\.attn",
    )


# ----------------------------------------------------------------------- OLMo-core: MoELinearRouter
class _OLMoBlock(nn.Module):
    """OLMo-core's ``MoELinearRouter`` (built by its ``MoERouterConfig``, its balancing and z-losses on) over
    experts of our own: its ``MoE`` layer's expert kernels (a binned gather) run on CUDA only."""

    #: the documents of each row of a ``[2, 6]`` input, for the v2 router's document-level expert pools (EMO)
    SEGMENTS = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1]])

    def __init__(self, v2: bool = False, emo: dict[str, Any] | None = None, **router: Any) -> None:
        super().__init__()
        self.v2 = v2
        if v2:
            lib = pytest.importorskip("olmo_core.nn.moe.v2.router")
            if emo is not None:
                router["emo"] = pytest.importorskip("olmo_core.nn.moe.emo").EmoRouterConfig(eos_token_id=0, **emo)
            self.router = lib.MoERouterConfigV2(d_model=D, num_experts=E, lb_loss_weight=0.01, **router).build()
        else:
            lib = pytest.importorskip("olmo_core.nn.moe.router")
            self.router = lib.MoERouterConfig(**router).build(D, E, lb_loss_weight=0.01, z_loss_weight=0.001)
        self.experts = nn.ModuleList(_Expert() for _ in range(E))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.router.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            if getattr(self.router, "score_bias", None) is not None:
                self.router.score_bias.copy_(0.5 * torch.randn(E, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx, _, _ = self.router(x, False, segment_ids=self.SEGMENTS) if self.v2 else self.router(x)
        flat, w, idx = x.reshape(-1, D), w.reshape(-1, w.shape[-1]), idx.reshape(-1, idx.shape[-1])
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(idx == e)
            out = out.index_add(0, token, w[token, slot, None].to(flat.dtype) * expert(flat[token]))
        return out.view_as(x)


_EMO = {"min_document_expert_pool": 2, "max_document_expert_pool": 3}

OLMO_EXACT: dict[str, tuple[dict[str, Any], bool]] = {
    # name: (MoERouterConfig options, train)
    "softmax-top2": ({"top_k": 2}, False),
    "top1-by-max": ({"top_k": 1}, False),
    "jitter-train": ({"top_k": 2, "jitter_eps": 0.1}, True),
    "sigmoid-score-bias-normalised-train": (
        {"top_k": 2, "gating_function": "sigmoid", "bias_gamma": 0.01, "normalize_expert_weights": 1.0},
        True,
    ),
    "random-assignment-train": ({"top_k": 2, "random_expert_assignment": True}, True),
    "v2-top1-by-max": ({"v2": True, "top_k": 1}, False),
    "v2-top-k-of-logits-then-softmax": ({"v2": True, "top_k": 2, "gating_function": "topk_softmax"}, False),
    "v2-grouped-sigmoid": (
        {"v2": True, "top_k": 2, "n_group": 2, "topk_group": 1, "gating_function": "sigmoid"},
        False,
    ),
    "v2-emo-document-pools": ({"v2": True, "top_k": 1, "emo": _EMO | {"eval_document_expert_pool": 2}}, False),
    "v2-emo-random-pool-sizes-train": ({"v2": True, "top_k": 1, "emo": _EMO}, True),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(OLMO_EXACT))
def test_olmo_core_router_replays_exactly(case: str) -> None:
    """OLMo-core ``MoELinearRouter``: a ``topk`` of the softmax or sigmoid scores (a ``max`` with ``keepdim`` for
    top-1), a jittered input in training, a score bias in the choice only (the weights gathered without it), the
    weights normalised, or random scores in place of the learned ones; its v2 router too, with the top-k of the
    logits, group-limited routing, and EMO's document-level expert pools (the experts each document keeps ranked
    by an ``argsort`` of its summed scores, of a random size in training, the others ``-inf``): exact, its losses
    from the replayed ids."""
    router, train = OLMO_EXACT[case]
    _assert_exact(
        lambda: _Stack(lambda: _OLMoBlock(**router)),
        _x(2, 6),
        reader=lambda m: _from_route_ids([layer.router for layer in m.layers], ids_at=1, k_first=False),
        routers=1,
        train=train,
    )


@pytest.mark.reliability("silent replays")
def test_olmo_core_uniform_expert_assignment_is_refused() -> None:
    """Its ``uniform_expert_assignment`` takes the ``topk`` and then assigns experts uniformly, whatever it chose:
    a capture would record experts no token went to. Refused."""
    model = _Stack(lambda: _OLMoBlock(top_k=2, uniform_expert_assignment=True))
    _assert_refused(model, _x(2, 6), "no decision-like call in its forward changes the output")


# ----------------------------------------------------------------------- cluster-moe: a tree of routers
def _refused_as_one_plain_forward(model: nn.Module, x: torch.Tensor, match: str, **options: Any) -> None:
    """Refused at the first capture, saying ``match``, the model left as it was (refused inside the forward) or as
    one plain forward leaves it (refused at its end: a library that counts its experts' use in buffers counts the
    capture's forward once, and nothing else)."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin(x)
    before, wrappers = snapshot(model), _wrappers(model)
    with pytest.raises(mr.UnsupportedRouterError, match=match):
        with mr.attach(model, **options) as session, torch.no_grad(), session.capture():
            model(x)
    assert _wrappers(model) == wrappers
    after = model.state_dict()
    assert any(
        after.keys() == want.keys() and all(torch.equal(after[k], v) for k, v in want.items())
        for want in (before, twin.state_dict())
    )


@pytest.mark.reliability("silent replays")
def test_cluster_of_experts_tree_router_is_refused() -> None:
    """cluster-moe's ``ClusterOfExpertsLayer``: its ``TreeRouter`` takes a ``topk`` of clusters, then a ``topk`` of
    experts by the router of each chosen cluster (its layers count each expert's use in buffers). Not found alone;
    beside a found router its choices are refused as neither recorded nor forced; named, refused as a choice whose
    scores an earlier one reshapes."""
    lib = pytest.importorskip("cluster_moe.main")
    config = lib.CoEConfig(
        d_model=D, d_ff=8, num_clusters=3, experts_per_cluster=E, top_k_clusters=1, top_k_experts=2, dropout=0.0
    )

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = lib.ClusterOfExpertsLayer(config)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(x)[0]

    torch.manual_seed(0)
    with pytest.raises(mr.RouterNotFoundError, match="no MoE router found"):
        mr.attach(_Stack(Layer))
    beside = _Beside(Layer).eval()
    _refused_as_one_plain_forward(beside, _x(2, 6), r"(?s)'table\.layer\.router' \(TreeRouter\): topk over 3 .* over 4")
    named = _Stack(Layer).eval()
    match = r"'layers\.0\.layer\.router': an earlier choice"
    _refused_as_one_plain_forward(named, _x(2, 6), match, include="layers.*.layer.router")


# ----------------------------------------------------------------------- vector-quantize-pytorch: nearest codes
class _Codes(nn.Module):
    """A quantiser of vector-quantize-pytorch (``name``), its quantised output alone."""

    def __init__(self, name: str, **options: Any) -> None:
        super().__init__()
        self.quantize = getattr(pytest.importorskip("vector_quantize_pytorch"), name)(**options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantize(x)[0]


QUANTISERS: dict[str, Callable[[], nn.Module]] = {
    "vector-quantize": lambda: _Codes("VectorQuantize", dim=D, codebook_size=2 * E),
    "vector-quantize-cosine-per-head": lambda: _Codes(
        "VectorQuantize", dim=D, codebook_size=2 * E, heads=2, separate_codebook_per_head=True, use_cosine_sim=True
    ),
    "residual-vq": lambda: _Codes("ResidualVQ", dim=D, codebook_size=2 * E, num_quantizers=2),
    "lookup-free": lambda: _Codes("LFQ", dim=D, codebook_size=2 * E),
    "finite-scalar": lambda: _Codes("FSQ", levels=[E, E], dim=D),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(QUANTISERS))
def test_nearest_codes_are_no_router_and_stay_native_beside_one(case: str) -> None:
    """vector-quantize-pytorch's quantisers (the nearest code, per head, in residual stages, lookup-free or finite
    scalar: an ``argmax`` or a rounding, rows of a codebook picked): no router found alone; beside a found router,
    not taken for a choice of experts (no false refusal), the router's replay exact."""
    make = QUANTISERS[case]
    _assert_refused(_Stack(make), _x(2, 8), "no MoE router found", error=mr.RouterNotFoundError)
    _assert_exact(
        lambda: _Beside(make),
        _x(2, 8),
        reader=lambda m: _from_experts([(m.moe, list(m.moe.experts))]),
        routers=1,
        is_expert=lambda name: "moe.experts" in name,
    )


# ----------------------------------------------------------------------- MixtureKit: a flag set around each forward
class _Collecting(_Gated):
    """MixtureKit's ``RoutedModule``: what it routed kept for a balancing loss where ``collect_aux_loss`` is set."""

    collect_aux_loss = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.training and self.collect_aux_loss:
            self.kept = out.detach()
        return out


class _SetsAround(nn.Module):
    """MixtureKit's ``MixtureKitForCausalLM.forward``: each routed module's ``collect_aux_loss`` set for the forward,
    put back in a ``finally``, so it reads the same at each run of the router and differs outside the forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([_Collecting()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            layer.collect_aux_loss = True
        try:
            for layer in self.layers:
                x = x + layer(x)
        finally:
            for layer in self.layers:
                layer.collect_aux_loss = False
        return x


@pytest.mark.reliability("silent replays")
def test_a_flag_the_forward_sets_around_its_routers_replays_exactly() -> None:
    """Once a false refusal: the model's own forward sets a flag on its routed modules and puts it back after
    (MixtureKit collects its balancing loss so): at every run of the router it reads the same, so nothing changed,
    but read as the block ended, outside the forward, it differed from its value when the decision was established,
    inside it, and the block was refused as changed. A flag that the code of a module on the way to the router sets
    (to a constant) is compared outside with its value at the last block boundary instead: the replay is exact."""
    _assert_exact(_SetsAround, _x(2, 6), reader=_experts_of, routers=1)


class _SetsFromState(_SetsAround):
    """As :class:`_SetsAround`, the flag set from the model's own attribute: at each forward it may read otherwise."""

    collect = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            layer.collect_aux_loss = self.collect
        try:
            for layer in self.layers:
                x = x + layer(x)
        finally:
            for layer in self.layers:
                layer.collect_aux_loss = False
        return x


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", ["set-from-state-switched", "set-around-and-a-setting-changed"])
def test_a_flag_set_around_the_routers_leaves_changes_inside_a_block_refused(case: str) -> None:
    """What a forward sets around its routers is let pass only where its code sets a constant, and only that
    setting: a flag set from the model's state, switched between two forwards of one block (the router runs under
    another value), or another setting of the router changed between them (its gate's ``out_features``), is refused
    as the block ends."""
    model: nn.Module = _SetsFromState() if case == "set-from-state-switched" else _SetsAround()
    x = _x(2, 6)
    with mr.attach(model) as session, torch.no_grad():
        with pytest.raises(mr.SessionStateError, match="changed inside this capture"):
            with session.capture():
                model(x)
                if case == "set-from-state-switched":
                    model.collect = False
                else:
                    model.layers[0].gate.out_features = E + 1
                model(x)


@pytest.mark.reliability("silent replays")
def test_mixturekit_traditional_moe_replays(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once a false refusal (its ``collect_aux_loss``, set around each forward: see
    :func:`test_a_flag_the_forward_sets_around_its_routers_replays_exactly`): MixtureKit's traditional MoE built
    from two tiny Qwen3 checkpoints (its own merge and modeling code, loaded with ``trust_remote_code``): its
    ``gate`` found, the capture and the replay of the same input the same output."""
    kit = pytest.importorskip("MixtureKit")
    transformers = pytest.importorskip("transformers")
    paths = []
    for i in range(2):
        torch.manual_seed(i)
        config = transformers.Qwen3Config(
            vocab_size=64, hidden_size=D, intermediate_size=2 * D, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
        )  # fmt: skip
        transformers.Qwen3ForCausalLM(config).save_pretrained(tmp_path / f"expert{i}")
        paths.append(str(tmp_path / f"expert{i}"))
    monkeypatch.chdir(tmp_path)  # (the merge is written under the working directory)
    merge = {
        "moe_method": "traditional",
        "model_type": "tinykit",
        "experts": [{"expert_name": f"e{i}", "model_id": p} for i, p in enumerate(paths)],
        "num_experts_per_tok": 1,
    }
    path = kit.build_moe(merge, torch_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    with mr.attach(model) as session, torch.no_grad():
        assert session.names == ("model.layers.0.mlp.gate",)
        with session.capture():
            captured = model(ids).logits
        with session.replay(session.routes()):
            assert torch.equal(model(ids).logits, captured)


# ----------------------------------------------------------------------- routing-transformer: k-means attention
@pytest.mark.reliability("silent replays")
def test_routing_transformer_with_an_moe_layer_replays_its_router_only() -> None:
    """routing-transformer's ``RoutingTransformerLM`` with an MoE layer (lucidrains ``mixture-of-experts``, its
    second expert always kept): the ``argmax`` of each query's nearest k-means centroid in its attention is no
    router and not refused beside one (no false refusal); the MoE's gate found alone, its capture replayed."""
    lib = pytest.importorskip("routing_transformer")
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    model = lib.RoutingTransformerLM(
        num_tokens=32, dim=D, depth=1, max_seq_len=8, heads=2, window_size=4, causal=True, moe_layers=(1,),
        moe_num_experts=E,
    ).eval()  # fmt: skip
    gates = [m for m in model.modules() if hasattr(m, "second_policy_eval")]
    for gate in gates:
        gate.second_policy_eval = "all"
    with torch.no_grad():
        model(ids)  # (its k-means centroids drawn from the first batch)
    with mr.attach(model) as session, torch.no_grad():
        assert [model.get_submodule(name) for name in session.names] == gates
        with session.capture():
            captured = model(ids)[0]
        routes = session.routes()
        with session.replay(routes):
            assert torch.equal(model(ids)[0], captured)
