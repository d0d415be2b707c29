"""Routing replay in TRL's ``GRPOTrainer``: R2 with transformers generation, R3 with vLLM.

:class:`RoutingReplayGRPOTrainer` is TRL's ``GRPOTrainer`` with routing replay. It records
the experts the policy chose for every rollout token and forces them in every later
forward over those completions: the old-logprob forward, each ``num_iterations`` pass of
the loss, and the reference model's forward when the reference is an MoE of the same
architecture. Combine weights still come from the current router scores, so the routers
keep learning.

* **R2**, ``use_vllm=False``: the routes are captured while ``generate()`` runs, split per
  sequence (:func:`~moe_replay.split_generation`) and laid out for TRL's batches, left-padded
  prompts then right-padded completions (:meth:`~moe_replay.BatchLayout.split`).
* **R3**, ``use_vllm=True`` with ``vllm_mode="colocate"``: the routes are read from vLLM's
  ``CompletionOutput.routed_experts`` (:func:`moe_replay.interop.from_vllm_output`). The
  trainer starts vLLM with ``enable_return_routed_experts=True``, the one vLLM option this needs.

Three lines change in a TRL script::

    from moe_replay.integrations.trl import RoutingReplayGRPOTrainer   # instead of trl's GRPOTrainer

    trainer = RoutingReplayGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)
    trainer.train()

Logged every step, next to TRL's own metrics (``clip_ratio/*``, and with vLLM
``sampling/importance_sampling_ratio/*``):

* ``moe_replay/<forward>/decisions_differ`` and ``.../tokens_differ``: the share of router
  decisions, and of tokens in at least one router, where the router left free would choose
  other experts than the rollout did, over the tokens the batch attends to (not padding, nor
  the completions ``mask_truncated_completions`` masks out) (``<forward>``: ``old`` for the old-logprob forward,
  ``train`` for the loss forwards, ``ref`` for the reference model, a PEFT policy's with its
  adapter disabled included; a forward where no decision was compared logs neither);
* ``moe_replay/native_rows``: the share of (token, router) rows of the sequences that have
  no recorded route and are routed natively (the last token of each sequence: no forward
  routed it);
* ``moe_replay/ratio/max``, ``.../min``, ``.../outside_clip``: the importance ratio
  ``exp(logp - old_logp)`` over completion tokens, and the share of them outside
  ``[1 - epsilon_low, 1 + epsilon_high]``.

The "free" choice is the top-k of what the router's decision ran on, kept by
:meth:`~moe_replay.Session.keep_scores`: its scores for routers that take a plain top-k of
them (Qwen-MoE, Mixtral, OLMoE), the group-masked copy for group-limited routers
(DeepSeek-V3), whose group mask the forward computes from the current scores.

Tested with TRL 1.16 (``GRPOTrainer`` internals change between releases: other versions are
refused unless ``allow_untested_trl=True``). Not supported (refused at construction): tools
and environments, ``rollout_func``, transformers continuous batching, vision-language
models, and vLLM server mode (TRL's server does not return ``routed_experts``); with
``routing_replay="replay"``, a load-balancing loss under reentrant gradient checkpointing
(``use_reentrant=True``: the loss forward runs without gradients, so the replayed loss would
give the routers none).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .._checks import check_count, is_collection, is_integer, is_one_of
from ..batch import BatchLayout
from ..errors import (
    ArgumentTypeError,
    InvalidArgumentError,
    MissingDependencyError,
    MoEReplayError,
    RouterNotFoundError,
    RoutesValidationError,
    SessionStateError,
    UnsupportedRouterError,
    _check_calls,
)
from ..generation import split_generation
from ..interop import LayerMap
from ..losses import RouterScores, load_balancing_loss
from ..metrics import compare
from ..routes import Routes
from ..session import DEFAULT_CAPACITY, Session, attach

try:
    import trl
    from trl import GRPOTrainer
except ImportError as e:  # pragma: no cover - exercised only without trl
    raise MissingDependencyError(
        "moe_replay.integrations.trl needs TRL: pip install 'moe_replay[trl]' (or pip install 'trl>=1.16,<1.17')"
    ) from e

__all__ = [
    "MODES",
    "TESTED_TRL",
    "RoutingReplayGRPOTrainer",
    "RoutingReplayMixin",
    "UnsupportedTrainerSetupError",
    "rollout_routes_from_generate",
    "rollout_routes_from_vllm",
    "routes_from_vllm_output",
]

#: TRL releases (major.minor) this integration was tested with.
TESTED_TRL: tuple[str, ...] = ("1.16",)

#: ``routing_replay`` values: force the rollout's experts, only measure, or do nothing.
MODES = ("replay", "measure", "off")

#: Key of the per-completion ``[serial, index]`` tensor added to TRL's batches.
IDS_KEY = "moe_replay_ids"

_OVERRIDDEN = (
    "_generate_single_turn",
    "_generate_and_score_completions",
    "_get_per_token_logps_and_entropies",
    "compute_loss",
)


class UnsupportedTrainerSetupError(MoEReplayError, ValueError):
    """A trainer configuration that routing replay does not support; refused before training."""


# ----------------------------------------------------------------------------- rollouts
@dataclass
class _Rollout:
    """Per-sequence routes of one generation batch, and the tokens they were recorded for."""

    serial: int
    mode: str
    source: str
    routes: list[Routes]
    prompts: list[list[int]]
    completions: list[list[int]]
    layouts: dict[tuple[Any, ...], _BatchRoutes] = field(default_factory=dict)


@dataclass
class _BatchRoutes:
    """Replay routes for one ``[B, P + C]`` batch, with what the metrics need."""

    routes: Routes
    missing: torch.Tensor  # [T, L] bool, host
    native_share: float  # -1 rows among the sequences' own (token, router) rows
    device_rows: dict[str, torch.Tensor] = field(default_factory=dict)


def _as_ids(tokens: Any, what: str = "token ids") -> list[int]:
    """One sequence's token ids as ints: a list, tuple, array or tensor of integers.

    A float (5.4), a string or a bool is no token id, and is refused rather than cut to one: the
    ids are compared with those the routes were recorded for, and a cut id would pass as another.
    An empty tensor of any dtype (``torch.tensor([])``, an empty prompt) holds no such value, and a
    0-d integer numpy array is an integer.
    """
    if isinstance(tokens, torch.Tensor):
        # (an empty tensor holds no value that is not an id, whatever its dtype: torch.tensor([]) is float32)
        if tokens.numel() and (tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool):
            raise RoutesValidationError(f"{what} must be integer token ids, got a tensor of {tokens.dtype}")
        tokens = tokens.detach().cpu().reshape(-1).tolist()
    elif hasattr(tokens, "dtype") and hasattr(tokens, "tolist") and getattr(tokens, "ndim", 0) > 0:  # numpy
        tokens = list(tokens.reshape(-1))
    if not is_collection(tokens) or isinstance(tokens, dict):
        raise ArgumentTypeError(f"{what} must be a list of token ids, got {type(tokens).__name__}")
    # (a 0-d numpy array holds one value: an id where that value is an integer, checked below)
    out = [t[()] if isinstance(t, np.ndarray) and t.ndim == 0 else t for t in tokens]
    bad = [t for t in out if not is_integer(t)]
    if bad:
        raise RoutesValidationError(f"{what} must be integer token ids, got {bad[0]!r:.40} ({type(bad[0]).__name__})")
    return [int(t) for t in out]


def _id_lists(values: Any, what: str) -> list[list[int]]:
    """One list of token ids per sequence (see :func:`_as_ids`)."""
    if not is_collection(values) or isinstance(values, dict):
        raise ArgumentTypeError(f"{what} must hold one list of token ids per sequence, got {type(values).__name__}")
    return [_as_ids(v, f"{what}[{i}]") for i, v in enumerate(values)]


def rollout_routes_from_generate(
    routes: Routes,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    *,
    pad_to_multiple_of: int | None = None,
) -> list[Routes]:
    """Per-sequence routes from a capture around TRL's transformers ``generate()`` call.

    TRL left-pads the prompts to the longest (rounded up to ``pad_to_multiple_of``) and
    cuts each completion after its first end-of-sequence token. Each result holds
    ``len(prompt) + len(completion)`` rows; the last one is -1 (no forward routed it), and
    knows its tokens (:attr:`~moe_replay.Routes.token_ids`).

    Raises:
        RoutesValidationError: the capture does not fit the prompts and completions, or a
            token is not the one its row was fed (completions of another call, or in
            another order).
    """
    if not isinstance(routes, Routes):
        raise ArgumentTypeError(
            f"routes must be the Routes of the capture around generate(), got {type(routes).__name__}"
        )
    prompts = _id_lists(prompt_ids, "prompt_ids")
    completions = _id_lists(completion_ids, "completion_ids")
    if len(prompts) != len(completions) or not prompts:
        raise RoutesValidationError(f"got {len(prompts)} prompts for {len(completions)} completions")
    width = max(len(p) for p in prompts)
    # (the count it holds, a plain int: a 0-d tensor would make the width a tensor, compared with no row count)
    multiple = 0 if pad_to_multiple_of is None else check_count(pad_to_multiple_of, "pad_to_multiple_of")
    if multiple > 0:
        width = math.ceil(width / multiple) * multiple
    empty = [i for i, c in enumerate(completions) if not c]
    if empty:
        raise RoutesValidationError(f"completion {empty[0]} is empty; generate() returns at least one token")
    # generate() stops when every sequence has ended or after max_new_tokens: the longest completion has them all
    b, n = len(prompts), max(len(c) for c in completions)
    rows = set(routes.tokens_per_layer)
    expected = b * width + b * (n - 1)
    if rows != {expected}:
        raise RoutesValidationError(
            f"the capture around generate() holds {sorted(rows)} rows per router, but {b} prompts of {width} "
            f"positions and {n} new tokens with a KV cache give {b}*{width} + {b}*{n - 1} = {expected}. Are "
            "prompt_ids and completion_ids those of this generate() call, every sequence it ran (not a part of its "
            "batch) with each prompt as tokenized and each completion as returned? Did generate() run without a KV "
            "cache (use_cache=False in the model's config or generation kwargs: each step then routes the whole "
            "sequence again), or more than once?"
        )
    # generate()'s [B, width + n] output, as far as TRL kept it: each token checked against the one its row was fed
    grid = torch.zeros(b, width + n, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        grid[i, width - len(p) : width] = torch.tensor(p, dtype=torch.long)
        grid[i, width : width + len(c)] = torch.tensor(c, dtype=torch.long)
    seqs = split_generation(
        routes,
        batch_size=len(prompts),
        prompt_len=width,
        prompt_lengths=[len(p) for p in prompts],
        padding_side="left",
        lengths=[len(c) for c in completions],
        new_tokens=n,
        sequences=grid,
    )
    for i, (s, p, c) in enumerate(zip(seqs, prompts, completions, strict=True)):
        if s.num_tokens != len(p) + len(c):  # pragma: no cover - split_generation guarantees it
            raise RoutesValidationError(f"sequence {i}: {s.num_tokens} rows for {len(p) + len(c)} tokens")
    return seqs


def routes_from_vllm_output(request_output: Any, layer_map: LayerMap, *, index: int = 0) -> Routes:
    """Routes of completion ``index`` of one vLLM ``RequestOutput``: the trainer's only engine reader.

    vLLM 0.22 and later write ``CompletionOutput.routed_experts`` as one array
    ``[prompt_len + gen_len - 1, num_hidden_layers, top_k]`` over every hidden layer (dense
    layers' columns 0), uint8 up to 256 experts; :func:`moe_replay.interop.from_vllm_output`
    reads it. The result has ``prompt_len + gen_len`` rows, the last one -1.
    """
    from .. import interop

    return interop.from_vllm_output(request_output, layer_map, index=index)


def rollout_routes_from_vllm(
    outputs: Sequence[Any],
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    layer_map: LayerMap,
) -> list[Routes]:
    """Per-sequence routes from the ``RequestOutput`` list of vLLM's ``LLM.generate``.

    Completions are taken in order (every completion of the first request, then of the
    next); each must hold exactly the prompt and completion tokens TRL trains on.

    Raises:
        RoutesValidationError: the outputs do not match the prompts and completions, or
            a completion has no ``routed_experts`` (vLLM was started without
            ``enable_return_routed_experts=True``).
    """
    if not is_collection(outputs) or isinstance(outputs, dict):
        raise ArgumentTypeError(
            f"outputs must be the list of RequestOutputs LLM.generate returned, got {outputs!r:.60}"
        )
    found: list[tuple[Any, int]] = []
    for i, o in enumerate(outputs):
        outs: Any = getattr(o, "outputs", None)
        if not is_collection(outs) or not hasattr(outs, "__len__"):
            raise RoutesValidationError(
                f"outputs[{i}] is a {type(o).__name__} without a list of completions (RequestOutput.outputs): pass the "
                "RequestOutputs LLM.generate returned"
            )
        found.extend((o, j) for j in range(len(outs)))
    prompt_ids, completion_ids = _id_lists(prompt_ids, "prompt_ids"), _id_lists(completion_ids, "completion_ids")
    if len(found) != len(completion_ids) or len(prompt_ids) != len(completion_ids):
        raise RoutesValidationError(
            f"vLLM returned {len(found)} completions, but the trainer holds {len(completion_ids)} completions "
            f"for {len(prompt_ids)} prompts"
        )
    seqs = []
    for i, ((out, j), p, c) in enumerate(zip(found, prompt_ids, completion_ids, strict=True)):
        held = getattr(out, "prompt_token_ids", None)
        vllm_p = [] if held is None else _as_ids(held, f"vLLM's prompt_token_ids of completion {i}")
        if vllm_p != p or _as_ids(out.outputs[j].token_ids, f"vLLM's token_ids of completion {i}") != c:
            raise RoutesValidationError(
                f"completion {i}: vLLM's prompt and completion tokens differ from those the trainer holds; the "
                "outputs are not in the trainer's order"
            )
        r = routes_from_vllm_output(out, layer_map, index=j)
        if r.num_tokens != len(p) + len(c):
            raise RoutesValidationError(
                f"completion {i}: vLLM's routed_experts give {r.num_tokens} rows for {len(p)} prompt and {len(c)} "
                "completion tokens"
            )
        seqs.append(r.with_token_ids(p + c))
    return seqs


@contextlib.contextmanager
def _recording(obj: Any, method: str) -> Iterator[list[Any]]:
    """Record what ``obj.method(...)`` returns while the block runs; the method is put back after."""
    calls: list[Any] = []
    own = obj.__dict__.get(method, _MISSING)
    original = getattr(obj, method)

    def recorded(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        calls.append(out)
        return out

    setattr(obj, method, recorded)
    try:
        yield calls
    finally:
        if own is _MISSING:
            delattr(obj, method)
        else:
            setattr(obj, method, own)


class _Missing:
    pass


_MISSING = _Missing()


@contextlib.contextmanager
def _engine_returns_routes(enabled: bool) -> Iterator[None]:
    """Build TRL's colocated vLLM engine with ``enable_return_routed_experts=True``.

    TRL 1.16 passes no engine options through its config, so the constructor TRL calls
    gets this one added while the trainer is built.
    """
    if not enabled:
        yield
        return
    from trl.generation import vllm_generation

    original = getattr(vllm_generation, "LLM", None)
    if original is None:  # vLLM is not installed: TRL raises its own ImportError
        yield
        return

    def llm(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("enable_return_routed_experts", True)
        return original(*args, **kwargs)

    vllm_generation.LLM = llm
    try:
        yield
    finally:
        vllm_generation.LLM = original


def _check_trl_version(allow_untested: bool) -> None:
    version = str(getattr(trl, "__version__", "0"))
    minor = ".".join(version.split(".")[:2])
    if minor not in TESTED_TRL and not allow_untested:
        raise UnsupportedTrainerSetupError(
            f"moe_replay's TRL integration was tested with TRL {', '.join(TESTED_TRL)}.x, this is TRL {version}: "
            "GRPOTrainer's internals that it extends change between releases. Install "
            "'trl>=1.16,<1.17' (pip install 'moe_replay[trl]'), or pass allow_untested_trl=True and check the "
            "logged moe_replay/* metrics"
        )
    missing = [m for m in _OVERRIDDEN if not callable(getattr(GRPOTrainer, m, None))]
    if missing:
        raise UnsupportedTrainerSetupError(
            f"this TRL's GRPOTrainer has no {missing}: the integration cannot hook into it; install 'trl>=1.16,<1.17'"
        )


#: The ``attach`` options a trainer passes on through ``attach_kwargs``.
_ATTACH_OPTIONS = ("include", "exclude", "adapters", "top_k", "num_experts", "max_bytes")


def _check_options(
    replay_ref_model: object,
    verify_replay: object,
    capacity: object,
    attach_kwargs: object,
    allow_untested_trl: object = False,
) -> dict[str, Any]:
    """Refuse this integration's own arguments when they are of the wrong kind; returns ``attach_kwargs``.

    A flag is never read by truth value: ``allow_untested_trl="false"`` from a config file is a true string."""
    if not isinstance(replay_ref_model, bool | np.bool_ | None):
        raise InvalidArgumentError(f"replay_ref_model must be None, True or False, got {replay_ref_model!r}")
    for name, flag in (("verify_replay", verify_replay), ("allow_untested_trl", allow_untested_trl)):
        if not isinstance(flag, bool | np.bool_):
            raise InvalidArgumentError(f"{name} must be True or False, got {flag!r}")
    # (a numpy integer or a 0-d tensor, a count kept from an array, is the count it holds, as mr.attach takes it)
    rows: Any = capacity
    if rows is not None and (not is_integer(rows) or int(rows) < 1):
        raise InvalidArgumentError(f"capacity must be a positive number of rows (or None), got {capacity!r}")
    if attach_kwargs is None:
        return {}
    if not isinstance(attach_kwargs, dict):
        raise InvalidArgumentError(f"attach_kwargs must be a dict of mr.attach options, got {attach_kwargs!r}")
    if "capacity" in attach_kwargs:
        raise InvalidArgumentError("pass capacity= to the trainer itself, not in attach_kwargs")
    if "keep_newest" in attach_kwargs:
        raise InvalidArgumentError(
            "attach_kwargs keep_newest: a ring that keeps only the newest rows drops the rollout's first rows, and "
            "the trainer needs the route of every token; leave it out (captures grow as needed)"
        )
    unknown = sorted(str(k) for k in attach_kwargs if k not in _ATTACH_OPTIONS)
    if unknown:
        raise InvalidArgumentError(
            f"attach_kwargs {unknown} are not options of mr.attach the trainer passes on; those are {_ATTACH_OPTIONS}"
        )
    return dict(attach_kwargs)


def _check_mode_reads(mode: str, replay_ref_model: object, verify_replay: object) -> None:
    """Refuse a setting that asks for what ``mode`` does not do, rather than train without it.

    ``verify_replay=True`` checks replayed forwards, which only ``"replay"`` runs; ``replay_ref_model=True`` requires
    the reference model's session (an error where there is none), which ``"off"`` never attaches."""
    asked = []
    if bool(verify_replay) and mode != "replay":
        asked.append("verify_replay=True (it checks replayed forwards, and this mode replays none)")
    if replay_ref_model is not None and bool(replay_ref_model) and mode == "off":
        asked.append(
            "replay_ref_model=True (it requires a session on the reference model, and this mode attaches none)"
        )
    if asked:
        raise InvalidArgumentError(
            f"routing_replay={mode!r} would train without {' and '.join(asked)}: set routing_replay='replay' to have "
            "it, or leave the setting out"
        )


def _peft_reference_active(model: nn.Module) -> bool:
    """Whether a PEFT policy runs as its own reference: its adapters disabled, or TRL's ``"ref"`` adapter active.

    TRL's ``use_adapter`` does one or the other around the reference forward of a PEFT policy. Only the
    instance's own attributes are read (no property of the model runs)."""
    state = vars(model)
    if state.get("_adapters_disabled") is True:  # PeftModel.disable_adapter()
        return True
    base = state.get("_modules", {}).get("base_model")
    configs = vars(base).get("peft_config") if base is not None else None
    active = vars(base).get("active_adapter") if base is not None else None
    return isinstance(configs, dict) and "ref" in configs and active in ("ref", ["ref"])


def _replay_aux_loss(kept: RouterScores, mask: torch.Tensor | None) -> torch.Tensor:
    """The load-balancing loss of a replayed forward (see :func:`~moe_replay.load_balancing_loss`): the replayed
    experts counted, the probabilities those of the router's scores (see :func:`_probabilities`)."""
    probs = [_probabilities(s, n, kept._squashed(n)) for s, n in zip(kept.scores, kept.names, strict=True)]
    return load_balancing_loss(probs, kept.indices, mask=mask)


def _probabilities(scores: torch.Tensor, name: str = "?", squashed: bool | None = None) -> torch.Tensor:
    """The router probabilities: ``scores`` if they are already a distribution per token, else their softmax, where
    the scores are the router's logits (a top-k of the logits, the k softmaxed after: GPT-OSS, Megatron).

    A softmax rounded to bfloat16 sums to 1 within a few of its own rounding steps only: the tolerance
    follows the scores' precision, or such probabilities would be taken for logits and softmaxed again.

    Raises:
        UnsupportedRouterError: scores that are neither (see :func:`_not_logits`): a softmax of them is not the
            probabilities the model's own load-balancing loss reads.
    """
    s = scores.detach()
    tol = max(1e-3, 2 * torch.finfo(s.dtype).eps) if s.dtype.is_floating_point else 1e-3
    if (
        s.numel()
        and bool((s >= 0).all())
        and torch.allclose(s.float().sum(-1), s.new_ones(s.shape[0]).float(), atol=tol)
    ):
        return scores
    why = _not_logits(scores, squashed)
    if why is not None:
        raise UnsupportedRouterError(
            f"router '{name}' decides on scores that are no probability distribution and not its logits ({why}: a "
            "sigmoid router, as DeepSeek-V3's or MiniMax-M2's). The load-balancing loss this trainer computes in a "
            "replay, E * sum_e f_e * P_e with P a softmax, would not be the model's own aux loss. Set "
            "router_aux_loss_coef=0.0 in the trainer's config and add the loss the model is trained with yourself, "
            "from the scores and replayed experts of Session.keep_scores(); or train with routing_replay='measure'"
        )
    return scores.float().softmax(-1)


#: the autograd nodes of an elementwise squashing: a router whose scores pass through one after its logits is not
#: one whose softmax of the scores is that of its logits
_SQUASHING = ("Sigmoid", "Tanh", "Softplus", "Relu", "Elu", "Gelu", "Silu", "Hardsigmoid", "Hardtanh")
#: the autograd nodes that make the logits (a matrix product): the walk back from the scores stops there
_PRODUCTS = ("Mm", "Addmm", "Bmm", "Linear", "Matmul", "Baddbmm", "Einsum", "Conv")


def _not_logits(scores: torch.Tensor, squashed: bool | None = None) -> str | None:
    """Why ``scores`` (no distribution) are not a router's logits, or None where nothing says so: their autograd graph
    passes through a squashing (a sigmoid) after the matrix product that makes the logits; with no graph (no gradients,
    a frozen router), every score lies in ``[0, 1]`` (a sigmoid's range, which logits of both signs leave). Scores of
    no graph that a bias moved out of that range are told by ``squashed``: the router's forward made them through a
    squashing after the logits, as the calls it made showed when its decision was established (see
    :attr:`~moe_replay.evidence.Evidence.squashed`). Read from the graph's node names, nothing runs."""
    node = scores.grad_fn
    if node is None and squashed:
        return "its forward made them through a squashing (a sigmoid) after its logits"
    if node is None:
        s = scores.detach()
        if s.numel() and bool(((s >= 0) & (s <= 1)).all()):
            return "every score lies in [0, 1], a sigmoid's range"
        return None
    seen: set[int] = set()
    todo = [node]
    while todo and len(seen) < 256:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        kind = type(node).__name__
        if any(kind.startswith(squash) for squash in _SQUASHING):
            return f"their graph passes through {kind.removesuffix('Backward0')} after the logits"
        if any(kind.startswith(product) for product in _PRODUCTS):
            continue
        todo.extend(n for n, _ in getattr(node, "next_functions", ()))
    return None


# ----------------------------------------------------------------------------- the trainer
class RoutingReplayMixin:
    """Routing replay over ``GRPOTrainer``'s extension points; put it before ``GRPOTrainer``.

    Args (keyword-only, on top of ``GRPOTrainer``'s):
        routing_replay: ``"replay"`` (default, or ``True``): force the rollout's experts in
            every later forward; ``"measure"``: route freely and log how far that is from the
            rollout's experts; ``"off"`` (or ``False``): attach nothing, exactly ``GRPOTrainer``.
        replay_ref_model: replay in the reference model's forward too. ``None`` (default):
            when it is an MoE with the same routers (a PEFT policy's reference, the policy with
            its adapter disabled, always is); ``True``: required (an error otherwise).
        verify_replay: also capture every replayed forward and check, with
            :func:`~moe_replay.compare`, that it used every forced expert (a host copy per
            forward; for debugging). Only with ``"replay"``: refused with another mode, which
            replays nothing to check (as ``replay_ref_model=True`` is with ``"off"``).
        capacity: capture rows per router; default: enough for one generation batch of
            ``max_completion_length`` tokens after prompts of up to 1024.
        attach_kwargs: passed to :func:`moe_replay.attach`: ``include``, ``exclude``, ``adapters``,
            ``top_k``, ``num_experts``, ``max_bytes`` (``capacity`` is the argument above;
            ``keep_newest`` is refused: it drops rollout rows).
        allow_untested_trl: run with a TRL release this integration was not tested with.

    Attributes:
        moe_session: the policy's :class:`~moe_replay.Session` (None when off).
        moe_ref_session: the reference model's session, when its forward is replayed.
    """

    moe_session: Session | None
    moe_ref_session: Session | None

    def __init__(
        self,
        *args: Any,
        routing_replay: str | bool = "replay",
        replay_ref_model: bool | None = None,
        verify_replay: bool = False,
        capacity: int | None = None,
        attach_kwargs: dict[str, Any] | None = None,
        allow_untested_trl: bool = False,
        **kwargs: Any,
    ) -> None:
        named: dict[Any, Any] = {True: "replay", False: "off"}
        mode = named.get(routing_replay, routing_replay) if isinstance(routing_replay, Hashable) else routing_replay
        if not is_one_of(mode, MODES):
            raise InvalidArgumentError(f"routing_replay must be one of {MODES} (or True/False), got {routing_replay!r}")
        attach_kwargs = _check_options(replay_ref_model, verify_replay, capacity, attach_kwargs, allow_untested_trl)
        _check_mode_reads(mode, replay_ref_model, verify_replay)
        # (numpy's True and False as the flags they are: `wanted is False` below reads np.False_ as no answer)
        replay_ref_model = None if replay_ref_model is None else bool(replay_ref_model)
        verify_replay, allow_untested_trl = bool(verify_replay), bool(allow_untested_trl)
        capacity = None if capacity is None else int(capacity)
        self._mr_mode: str = mode
        self.moe_session = None
        self.moe_ref_session = None
        self._mr_rollouts: dict[str, _Rollout | None] = {"train": None, "eval": None}
        self._mr_serial = 0
        self._mr_batch: tuple[str, list[int] | None, dict[str, Any] | None] | None = None
        self._mr_verify = bool(verify_replay)
        self._mr_replay_ref = replay_ref_model
        self._mr_layer_map: LayerMap | None = None
        if mode == "off":
            super().__init__(*args, **kwargs)
            return
        _check_trl_version(allow_untested_trl)
        config = kwargs.get("args") if "args" in kwargs else (args[2] if len(args) > 2 else None)
        _refuse_before(config, kwargs)
        use_vllm = bool(getattr(config, "use_vllm", False))
        with _engine_returns_routes(use_vllm and getattr(config, "vllm_mode", "colocate") == "colocate"):
            super().__init__(*args, **kwargs)
        _refuse_after(self)
        if mode == "replay":
            _refuse_reentrant_aux_loss(self)
        if capacity is None:
            a = self.args  # type: ignore[attr-defined]
            rows = a.per_device_train_batch_size * a.steps_per_generation * (a.max_completion_length + 1024)
            capacity = max(DEFAULT_CAPACITY, int(rows))
        model = self.model  # type: ignore[attr-defined]
        try:
            self.moe_session = attach(model, capacity=capacity, **attach_kwargs)
        except RouterNotFoundError as e:
            raise RouterNotFoundError(
                f"routing replay needs an MoE policy: {e}. Give the trainer those options as "
                "attach_kwargs={'include': ...}; a dense model has nothing to replay (routing_replay='off')"
            ) from None
        try:
            self.moe_ref_session = self._mr_attach_ref(replay_ref_model, capacity, attach_kwargs)
        except BaseException:
            self.moe_session.detach()
            raise

    # ------------------------------------------------------------- set-up
    def _mr_attach_ref(self, wanted: bool | None, capacity: int, attach_kwargs: dict[str, Any]) -> Session | None:
        """A session on the reference model when its forward is replayed.

        A PEFT reference is the policy itself with its adapter disabled (or TRL's ``"ref"`` adapter
        active): it has no model of its own, and its forward is replayed with the policy's session."""
        ref = getattr(self, "ref_model", None)
        if wanted and ref is None and not getattr(self, "beta", 0.0):
            raise UnsupportedTrainerSetupError(
                "replay_ref_model=True, but beta=0.0: the trainer builds no reference model and runs no reference "
                "forward. Set beta in GRPOConfig, or leave replay_ref_model unset"
            )
        if ref is None or wanted is False:
            return None
        assert self.moe_session is not None
        try:
            session = attach(ref, capacity=capacity, **attach_kwargs)
        except RouterNotFoundError:
            if wanted:
                raise UnsupportedTrainerSetupError(
                    "replay_ref_model=True, but the reference model has no router: it is not an MoE"
                ) from None
            return None
        if session.fingerprint != self.moe_session.fingerprint:
            session.detach()
            if wanted:
                raise UnsupportedTrainerSetupError(
                    "replay_ref_model=True, but the reference model's routers differ from the policy's (names, "
                    f"expert counts or k: fingerprint {session.fingerprint} against {self.moe_session.fingerprint})"
                )
            return None
        return session

    def detach_routing_replay(self) -> None:
        """Remove moe_replay from the models; the trainer then runs as a plain ``GRPOTrainer``."""
        for s in (self.moe_session, self.moe_ref_session):
            if s is not None:
                s.detach()
        self.moe_session = self.moe_ref_session = None
        self._mr_mode = "off"

    # ------------------------------------------------------------- generation
    def _generate_single_turn(
        self, prompt_ids: Any, images: Any, multimodal_fields: Any, num_generations: int, has_tool_images: bool = False
    ) -> Any:
        session = self.moe_session
        if session is None:
            return super()._generate_single_turn(  # type: ignore[misc]
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        mode = "train" if self.model.training else "eval"  # type: ignore[attr-defined]
        self._mr_rollouts[mode] = None
        if self.use_vllm:  # type: ignore[attr-defined]
            gen = self.vllm_generation  # type: ignore[attr-defined]
            if getattr(gen, "llm", None) is None:
                raise UnsupportedTrainerSetupError(
                    "routing replay reads routed_experts from the colocated vLLM engine (vllm_mode='colocate')"
                )
            with _recording(gen.llm, "generate") as calls:
                completion_ids, logprobs = super()._generate_single_turn(  # type: ignore[misc]
                    prompt_ids, images, multimodal_fields, num_generations, has_tool_images
                )
            if len(calls) != 1:
                raise SessionStateError(f"expected one vLLM generate call for this batch, saw {len(calls)}")
            outputs = list(calls[0])
            tp = int(getattr(gen, "tensor_parallel_size", 1) or 1)
            if tp > 1:  # TRL keeps this rank's share of the TP group's outputs
                rank = torch.distributed.get_rank(group=gen.tp_group)
                outputs = outputs[rank * len(prompt_ids) : (rank + 1) * len(prompt_ids)]
            seqs = rollout_routes_from_vllm(outputs, prompt_ids, completion_ids, self._mr_vllm_layer_map())
            source = "vLLM routed_experts"
        else:
            with session.capture():
                completion_ids, logprobs = super()._generate_single_turn(  # type: ignore[misc]
                    prompt_ids, images, multimodal_fields, num_generations, has_tool_images
                )
            seqs = rollout_routes_from_generate(
                session.routes(),
                prompt_ids,
                completion_ids,
                pad_to_multiple_of=self.pad_to_multiple_of,  # type: ignore[attr-defined]
            )
            source = "transformers generate()"
        self._mr_serial += 1
        self._mr_rollouts[mode] = _Rollout(
            serial=self._mr_serial,
            mode=mode,
            source=source,
            routes=seqs,
            prompts=[_as_ids(p) for p in prompt_ids],
            completions=[_as_ids(c) for c in completion_ids],
        )
        return completion_ids, logprobs

    def _mr_vllm_layer_map(self) -> LayerMap:
        if self._mr_layer_map is None:
            assert self.moe_session is not None
            cfg = self.model.config  # type: ignore[attr-defined]
            text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
            self._mr_layer_map = LayerMap.from_session(self.moe_session, int(text.num_hidden_layers))
        return self._mr_layer_map

    def _generate_and_score_completions(self, inputs: Any) -> dict[str, Any]:
        if self.moe_session is None:
            return super()._generate_and_score_completions(inputs)  # type: ignore[misc]
        mode = "train" if self.model.training else "eval"  # type: ignore[attr-defined]
        self._mr_rollouts[mode] = None
        self._mr_batch = (mode, None, None)
        try:
            output = super()._generate_and_score_completions(inputs)  # type: ignore[misc]
        finally:
            self._mr_batch = None
        rollout = self._mr_rollouts[mode]
        if rollout is None:
            raise SessionStateError("no routes were recorded for this generation batch")
        n = int(output["prompt_ids"].shape[0])
        if n != len(rollout.routes):
            raise RoutesValidationError(f"the batch holds {n} completions, the rollout recorded {len(rollout.routes)}")
        ids = torch.stack([torch.full((n,), rollout.serial, dtype=torch.long), torch.arange(n)], dim=1)
        output[IDS_KEY] = ids.to(output["prompt_ids"].device)
        return output

    # ------------------------------------------------------------- training forwards
    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        if self.moe_session is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)  # type: ignore[misc]
        ids = inputs.get(IDS_KEY)
        if ids is None:
            raise RoutesValidationError(
                f"this batch has no '{IDS_KEY}': it was not made by this trainer's generation, so its routes are "
                "unknown. Let the trainer generate the batches, or build it with routing_replay='off'"
            )
        ids = ids.detach().cpu()
        mode = "train" if self.model.training else "eval"  # type: ignore[attr-defined]
        rollout = self._mr_rollouts[mode]
        serials = set(ids[:, 0].tolist())
        if rollout is None or serials != {rollout.serial}:
            held = "none" if rollout is None else rollout.serial
            raise RoutesValidationError(
                f"this batch comes from generation batch {sorted(serials)}, but the routes held are of batch {held}: "
                "batches must be trained on before the next generation"
            )
        self._mr_batch = (mode, ids[:, 1].tolist(), inputs)
        try:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)  # type: ignore[misc]
        finally:
            self._mr_batch = None

    def _get_per_token_logps_and_entropies(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        logits_to_keep: int,
        batch_size: int | None = None,
        compute_entropy: bool = False,
        compute_aux_loss: bool = False,
        **kwargs: Any,
    ) -> Any:
        def plain(aux: bool = compute_aux_loss) -> Any:
            return super(RoutingReplayMixin, self)._get_per_token_logps_and_entropies(  # type: ignore[misc]
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, aux, **kwargs
            )

        if self.moe_session is None:
            return plain()
        ref = getattr(self, "ref_model", None)
        is_ref = ref is not None and model is ref
        session = self.moe_ref_session if is_ref else self.moe_session
        if not is_ref and ref is None and self._mr_batch is not None and self._mr_batch[1] is None:
            # TRL runs a PEFT policy's reference forward on the policy itself, its adapter disabled
            unwrap = getattr(getattr(self, "accelerator", None), "unwrap_model", None)
            is_ref = _peft_reference_active(unwrap(model) if callable(unwrap) else model)
            if is_ref and self._mr_replay_ref is False:
                session = None
        if session is None:
            return plain()  # a reference model that is not an MoE of the same architecture, or not to be replayed
        if self._mr_batch is None:
            raise SessionStateError(
                "a forward over completions ran outside the trainer's generation and loss steps, so moe_replay does "
                "not know which rollout's routes it needs"
            )
        mode, rows, inputs = self._mr_batch
        rollout = self._mr_rollouts[mode]
        if rollout is None:
            raise SessionStateError(f"no rollout routes are held for {mode} batches")
        kind = "ref" if is_ref else ("old" if rows is None else "train")
        if rows is None:
            rows = list(range(len(rollout.routes)))
        batch = _batch_routes(rollout, rows, input_ids, attention_mask, logits_to_keep)
        replaying = self._mr_mode == "replay"
        own_aux = compute_aux_loss and replaying
        with contextlib.ExitStack() as stack:
            if replaying:  # (a batch with no recorded row, every token prefix-cached or a last one, routes natively)
                stack.enter_context(session.replay(batch.routes, strict=not bool(batch.missing.all())))
            if self._mr_verify and replaying:
                stack.enter_context(session.capture())
            kept = stack.enter_context(session.keep_scores())
            logps, entropies, aux = plain(compute_aux_loss and not own_aux)
            stats = _disagreement(kept, batch, replaying, attention_mask)
            if own_aux:
                if kept._outside_graph_router() is not None:
                    raise UnsupportedTrainerSetupError(_REENTRANT_AUX_LOSS)
                aux = _replay_aux_loss(kept, attention_mask.reshape(-1))
            del kept
        if self._mr_verify and replaying:
            # every replayed row is checked, those the forward does not attend to (a completion TRL masks out) too:
            # the replay forced them as it forced the others
            c = compare(_every_row(session.routes()), _every_row(batch.routes))
            if int(c.differ.sum()) or int(c.compared.sum()) != int((~batch.missing).sum()):
                raise RoutesValidationError(
                    f"the {kind} forward did not use every replayed expert: {int(c.differ.sum())} of "
                    f"{int(c.compared.sum())} decisions differ from the routes"
                )
        metrics = self._metrics[mode]  # type: ignore[attr-defined]
        if stats is not None:  # (no decision compared: no figure, rather than a 0% that reads as agreement)
            metrics[f"moe_replay/{kind}/decisions_differ"].append(stats[0])
            metrics[f"moe_replay/{kind}/tokens_differ"].append(stats[1])
        if kind == "train":
            metrics["moe_replay/native_rows"].append(batch.native_share)
            old = None if inputs is None else inputs.get("old_per_token_logps")
            if old is not None and inputs is not None:
                self._mr_log_ratio(metrics, logps, old, inputs)
        return logps, entropies, aux

    def _mr_log_ratio(self, metrics: Any, logps: torch.Tensor, old: torch.Tensor, inputs: dict[str, Any]) -> None:
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        keep = mask.bool()
        if not bool(keep.any()):
            return
        ratio = torch.exp(logps.detach() - old)[keep]
        lo, hi = 1 - self.epsilon_low, 1 + self.epsilon_high  # type: ignore[attr-defined]
        out = ((ratio < lo) | (ratio > hi)).float().mean()
        vals = torch.stack([ratio.max(), ratio.min(), out]).tolist()
        metrics["moe_replay/ratio/max"].append(vals[0])
        metrics["moe_replay/ratio/min"].append(vals[1])
        metrics["moe_replay/ratio/outside_clip"].append(vals[2])


def _refuse_before(config: Any, kwargs: dict[str, Any]) -> None:
    """Refuse the set-ups that cannot work, before TRL builds anything."""
    for name in ("tools", "rollout_func", "environment_factory"):
        if kwargs.get(name):
            raise UnsupportedTrainerSetupError(
                f"routing replay does not support {name}= yet: multi-turn and custom rollouts generate outside the "
                "single generate() call it records. Pass routing_replay='off'"
            )
    if config is None:
        return
    if getattr(config, "use_transformers_continuous_batching", False):
        raise UnsupportedTrainerSetupError(
            "routing replay does not support use_transformers_continuous_batching: its generate_batch() schedules "
            "the tokens in an order the capture cannot split per sequence. Use the default generate() or vLLM"
        )
    if getattr(config, "use_vllm", False):
        if getattr(config, "vllm_mode", "colocate") != "colocate":
            raise UnsupportedTrainerSetupError(
                "routing replay with vLLM needs vllm_mode='colocate': TRL's vLLM server (trl vllm-serve) does not "
                "return vLLM's routed_experts"
            )
        extra = getattr(config, "generation_kwargs", None) or {}
        if extra.get("routed_experts_prompt_start"):
            raise UnsupportedTrainerSetupError(
                "routed_experts_prompt_start in generation_kwargs: the trainer needs the routes of the whole prompt"
            )
    else:
        extra = getattr(config, "generation_kwargs", None) or {}
        refusal = _unsplittable(extra.get)
        if refusal:
            raise UnsupportedTrainerSetupError(refusal)
        if extra.get("use_cache") is False:
            raise UnsupportedTrainerSetupError(
                "routing replay does not support use_cache=False in generation_kwargs: without a KV cache every "
                "decode step routes the whole sequence again, so no single route per token exists. Leave use_cache "
                "unset, or use vLLM"
            )


#: Why a chunked prefill is not split per sequence (split_generation takes one prompt forward).
_CHUNKED_PREFILL = (
    "routing replay does not support a chunked prefill (prefill_chunk_size): generate() then routes the prompts "
    "chunk by chunk, every sequence's chunk in turn, and split_generation splits one prompt forward only. Leave "
    "prefill_chunk_size unset, or use vLLM"
)


#: Why a beam search or assisted decoding cannot be split per sequence.
_REORDERED = (
    "routing replay does not support {what} in generate(): {why}, so the rows of a capture do not follow each "
    "sequence's tokens and cannot be split per sequence (refused here rather than after the generation has run). "
    "Sample or decode greedily, or use vLLM"
)


def _unsplittable(get: Callable[[str], Any]) -> str | None:
    """Why generate() with these settings (``get(name)`` reads one) records rows that cannot be split, or None."""
    if get("prefill_chunk_size"):
        return _CHUNKED_PREFILL
    beams = get("num_beams")
    if isinstance(beams, int) and beams > 1:
        return _REORDERED.format(what=f"beam search (num_beams={beams})", why="beams are reordered between steps")
    if get("assistant_model") is not None or get("prompt_lookup_num_tokens") or get("assistant_early_exit"):
        return _REORDERED.format(
            what="assisted decoding", why="candidate tokens are fed several at a time, rejected ones too"
        )
    return None


def _refuse_after(trainer: Any) -> None:
    if getattr(trainer, "_is_vlm", False):
        raise UnsupportedTrainerSetupError(
            "routing replay does not support vision-language models in GRPOTrainer yet (image tokens are untested)"
        )
    if getattr(getattr(trainer, "args", None), "use_vllm", False):
        return
    model = getattr(trainer, "model", None)
    configs = [getattr(trainer, "generation_config", None), getattr(model, "generation_config", None)]

    def setting(name: str) -> Any:
        """What generate() uses: the trainer's config, where it leaves a setting unset (None) the model's."""
        return next((v for v in (getattr(c, name, None) for c in configs if c is not None) if v is not None), None)

    refusal = _unsplittable(setting)
    if refusal:
        raise UnsupportedTrainerSetupError(refusal)


#: Why the replayed load-balancing loss cannot be computed under a reentrant activation checkpoint.
_REENTRANT_AUX_LOSS = (
    "routing replay computes the load-balancing loss from the replayed experts and the router scores of the loss "
    "forward, but gradient checkpointing with use_reentrant=True runs that forward without gradients, so the loss "
    "would give the routers no gradient. Set gradient_checkpointing_kwargs={'use_reentrant': False} in GRPOConfig "
    "(TRL forces True for a PEFT model under DeepSpeed ZeRO-3: there, leave gradient_checkpointing off), or "
    "router_aux_loss_coef=0.0 to train without the load-balancing loss"
)


def _refuse_reentrant_aux_loss(trainer: Any) -> None:
    """Refuse, before training, a replayed load-balancing loss that reentrant gradient checkpointing would cut off
    from the routers (the check at each loss forward catches a reentrant checkpoint set up another way)."""
    args = getattr(trainer, "args", None)
    if not getattr(trainer, "aux_loss_enabled", False):
        return
    # (transformers 5 names them activation_checkpointing*, the gradient_checkpointing* names their aliases; TRL
    # writes use_reentrant under the old name: either says it)
    names = ("activation_checkpointing", "gradient_checkpointing")
    if not any(getattr(args, n, False) for n in names):
        return
    settings = [getattr(args, f"{n}_kwargs", None) for n in names]
    if any(isinstance(kw, dict) and kw.get("use_reentrant") is True for kw in settings):
        raise UnsupportedTrainerSetupError(_REENTRANT_AUX_LOSS)


def _every_row(routes: Routes) -> Routes:
    """The same routes without what their capture knew of its prompt padding, nor the batch layout they were laid out
    for: :func:`compare` compares every row. (Only for the replayed routes against the capture of the very forward
    that replayed them, row for row: the replay's own checks placed each row.)"""
    out = routes.with_token_ids(routes.token_ids)
    out._fed_mask = None
    out._layout_pos = None
    return out


def _batch_routes(
    rollout: _Rollout, rows: list[int], input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int
) -> _BatchRoutes:
    """The replay routes of TRL's ``[B, P + C]`` batch, after checking it holds the rollout's tokens."""
    b, s = (int(x) for x in input_ids.shape)
    c = int(logits_to_keep)
    p = s - c
    key = (tuple(rows), p, s)
    cached = rollout.layouts.get(key)
    if len(rows) != b:
        raise RoutesValidationError(f"the batch has {b} rows, but {len(rows)} sequences were named for it")
    bad = [i for i in rows if not 0 <= i < len(rollout.routes)]
    if bad:
        raise RoutesValidationError(f"sequence {bad[0]} is not in the rollout of {len(rollout.routes)} sequences")
    prompts = [rollout.prompts[i] for i in rows]
    comps = [rollout.completions[i] for i in rows]
    long_p = [r for r, x in enumerate(prompts) if len(x) > p]
    long_c = [r for r, x in enumerate(comps) if len(x) > c]
    if long_p or long_c:
        r = (long_p or long_c)[0]
        raise RoutesValidationError(
            f"batch row {r} (rollout sequence {rows[r]}): its {len(prompts[r])} prompt and {len(comps[r])} completion "
            f"tokens do not fit the batch's {p} prompt and {c} completion positions: routes and batch do not line up"
        )
    layout = BatchLayout.split(
        [len(x) for x in prompts], [len(x) + len(y) for x, y in zip(prompts, comps, strict=True)], prompt_width=p,
        row_length=s,
    )  # fmt: skip
    expected = layout.tokens([torch.tensor(x + y) for x, y in zip(prompts, comps, strict=True)], pad_id=-1)
    placed = expected >= 0
    got = input_ids.detach().cpu()
    wrong = (got != expected) & placed
    if bool(wrong.any()):
        r, t = (int(v) for v in wrong.nonzero()[0])
        raise RoutesValidationError(
            f"batch row {r}, position {t} holds token {int(got[r, t])}, but rollout sequence {rows[r]} has token "
            f"{int(expected[r, t])} there: routes and batch do not line up (a batch edited after generation?)"
        )
    outside = attention_mask.detach().cpu().bool() & ~placed
    if bool(outside.any()):
        r, t = (int(v) for v in outside.nonzero()[0])
        raise RoutesValidationError(
            f"batch row {r} attends to position {t}, outside rollout sequence {rows[r]}'s tokens: routes and batch "
            "do not line up"
        )
    if cached is not None:
        return cached
    routes = layout.routes([rollout.routes[i] for i in rows])
    missing = routes.missing
    own = placed.reshape(-1)
    native = float(missing[own].float().mean()) if bool(own.any()) else 0.0
    out = _BatchRoutes(routes=routes, missing=missing, native_share=native)
    rollout.layouts[key] = out
    return out


def _disagreement(
    kept: RouterScores, batch: _BatchRoutes, replaying: bool, attention_mask: torch.Tensor
) -> tuple[float, float] | None:
    """Shares of decisions and of tokens where the free choice differs from the rollout's routes; None where no
    decision was compared (every attended row unrecorded), as :func:`~moe_replay.compare` gives NaN there.

    Only the tokens the batch attends to count: a completion TRL masks out (``mask_truncated_completions``)
    is forwarded without its own context, so its free choice says nothing of the rollout's."""
    routes = batch.routes
    t = routes.num_tokens
    attended = attention_mask.detach().reshape(-1).bool()
    acc: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (decisions, tokens)
    for name in routes.names:
        try:
            scores, used = kept[name]
            choice = kept._choice_scores(name)
        except LookupError as e:
            raise SessionStateError(
                f"router '{name}' kept no scores in this forward (a compiled model?): the routing metrics need an "
                "eager forward"
            ) from e
        if scores.shape[0] != t:
            raise RoutesValidationError(
                f"router '{name}' made {scores.shape[0]} decisions in this forward, the routes hold {t} rows"
            )
        device = scores.device
        rollout = batch.device_rows.get(name)
        if rollout is None or rollout.device != device:
            rollout = batch.device_rows[name] = routes.layer(name).to(device)
        free = choice.topk(used.shape[1], dim=-1).indices if replaying else used
        valid = (rollout[:, 0] >= 0) & attended.to(device)
        d = (free.sort(-1).values != rollout.sort(-1).values).any(-1) & valid
        if acc is None:
            acc = (d.sum(), valid.sum(), d.clone(), valid.clone())
        else:
            acc = (acc[0] + d.sum(), acc[1] + valid.sum(), acc[2] | d, acc[3] | valid)
    assert acc is not None  # (routes hold at least one router)
    differ, compared, token_any, token_seen = acc
    n_diff, n_cmp, t_diff, t_seen = torch.stack([differ, compared, token_any.sum(), token_seen.sum()]).tolist()
    if not n_cmp:
        return None
    return n_diff / n_cmp, t_diff / t_seen


class RoutingReplayGRPOTrainer(RoutingReplayMixin, GRPOTrainer):
    """TRL's ``GRPOTrainer`` with routing replay (R2 with transformers generation, R3 with colocated vLLM).

    Takes ``GRPOTrainer``'s arguments and the keyword arguments of :class:`RoutingReplayMixin`.

    Example:
        >>> from moe_replay.integrations.trl import RoutingReplayGRPOTrainer  # doctest: +SKIP
        >>> trainer = RoutingReplayGRPOTrainer(  # doctest: +SKIP
        ...     model="Qwen/Qwen3-30B-A3B", reward_funcs=reward, args=GRPOConfig(num_iterations=2), train_dataset=ds
        ... )
        >>> trainer.train()  # doctest: +SKIP
    """


_check_calls(__name__)  # (a call that does not bind names what is wrong: see moe_replay.errors)
