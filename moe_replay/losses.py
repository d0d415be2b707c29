"""Training losses that follow the replayed routes, and the router scores they need.

A model's own load-balancing (auxiliary) loss usually runs its own top-k again on the
router logits: transformers' ``load_balancing_loss_func`` (Mixtral, Qwen-MoE, OLMoE...)
takes ``router_logits`` and calls ``torch.topk`` on them, outside the router's forward.
During a replay that top-k is neither seen nor forced by moe_replay, so such a loss
counts the experts the *current* router would choose, not the experts the forward used.
:func:`load_balancing_loss` counts the experts that were actually used (the replayed
ones) and takes its probabilities from the scores each router computed in this forward,
so its gradient reaches the routers.

Get both from the session with :meth:`Session.keep_scores`:

Example:
    >>> import torch, moe_replay as mr
    >>> model = mr.models.build("softmax_topk")
    >>> x = torch.randint(0, model.config.vocab_size, (2, 8))
    >>> session = mr.attach(model)
    >>> with session.capture():
    ...     _ = model(x)
    >>> routes = session.routes()
    >>> with session.replay(routes), session.keep_scores() as seen:
    ...     out = model(x, labels=x)
    >>> seen
    RouterScores(routers=2, tokens=[16, 16])
    >>> aux = mr.load_balancing_loss(seen.scores, seen.indices)  # this router's top-k runs on probabilities
    >>> (out.loss + 0.01 * aux).backward()
    >>> session.detach()
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Iterator, Sequence

import torch

from .errors import ArgumentTypeError, InvalidArgumentError, RouterNotFoundError, UnknownRouterError

__all__ = ["RouterScores", "load_balancing_loss"]

#: score tensors kept in the forward of an ``autograd.Function`` (a reentrant activation checkpoint's runs without
#: gradients): a loss on them would get no gradient, while the model's own outputs get theirs through the recompute
_OUTSIDE_GRAPH: dict[int, weakref.ref[torch.Tensor]] = {}


def _mark_outside_graph(t: torch.Tensor) -> None:
    """Note ``t`` as kept in the forward of an ``autograd.Function`` (held weakly, by identity)."""
    key = id(t)

    def forget(_: object, key: int = key) -> None:
        _OUTSIDE_GRAPH.pop(key, None)

    _OUTSIDE_GRAPH[key] = weakref.ref(t, forget)


def _kept_outside_graph(t: torch.Tensor) -> bool:
    ref = _OUTSIDE_GRAPH.get(id(t))
    return ref is not None and ref() is t


def _outside_graph_error(what: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"{what} kept inside the forward of a reentrant activation checkpoint (use_reentrant=True, or another "
        "autograd.Function that runs its forward again in backward): that forward runs without gradients, so a "
        "loss on these scores would silently give the routers no gradient. Checkpoint with use_reentrant=False "
        "(the kept scores then carry their gradients), or compute the loss inside the checkpointed function"
    )


def _outside_graph(t: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and _kept_outside_graph(t)


class RouterScores:
    """What each router's decision call saw while :meth:`Session.keep_scores` was open.

    For every router: the score tensor its top-k (or argmax) ran on, ``[tokens, E]``, with
    its autograd graph, and the experts the forward used, ``[tokens, k]`` int64 (the
    forced ones during a replay). Several forwards are concatenated in call order.
    Recomputes of activation checkpointing are not counted again. Read by router name
    (``kept[name]``, ``name in kept``); iterating gives the names.

    The scores are what the model passed to its top-k: probabilities for routers that
    pick on softmax outputs (Qwen-MoE, Mixtral in transformers), logits for routers that
    pick first and softmax the k after (``softmax(scores)`` gives the probabilities), and
    whatever a biased or group-limited router selects on (DeepSeek-V3 selects on detached
    scores plus a bias: no gradient flows through those).

    Example:
        >>> import torch, moe_replay as mr
        >>> model = mr.models.build("softmax_topk")
        >>> x = torch.randint(0, model.config.vocab_size, (2, 8))
        >>> with mr.attach(model) as session, session.keep_scores() as kept:
        ...     out = model(x, labels=x)
        >>> kept
        RouterScores(routers=2, tokens=[16, 16])
        >>> scores, experts = kept["layers.0.mlp.router"]
        >>> tuple(scores.shape), tuple(experts.shape)
        ((16, 8), (16, 2))
        >>> aux = mr.load_balancing_loss(kept.scores, kept.indices)  # differentiable in the scores
        >>> (out.loss + 0.01 * aux).backward()
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names: tuple[str, ...] = tuple(names)
        # per decision: the scores, the experts used, the masked copy of the scores the top-k ran on where a
        # group-limited router masks them first (None otherwise: the top-k ran on the scores themselves), and
        # whether the scores were made through a squashing after the logits (see Evidence.squashed; None: unknown)
        self._calls: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool | None]]] = {
            n: [] for n in self.names
        }

    def _squashed(self, name: str) -> bool | None:
        """Were one router's scores made through a squashing (a sigmoid) after its logits, as its forward showed when
        its decision was established? None where that is not known (see :attr:`Evidence.squashed`)."""
        marks = {c[3] for c in self._calls[name]}
        return True if True in marks else (False if marks == {False} else None)

    def _get(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        calls = self._calls[name]
        if not calls:
            raise RouterNotFoundError(
                f"router '{name}' made no decision while the scores were kept; run the forward inside "
                "`with session.keep_scores():`"
            )
        if len(calls) == 1:
            return calls[0][0], calls[0][1]
        scores = torch.cat([c[0] for c in calls])
        if any(_kept_outside_graph(c[0]) for c in calls):
            _mark_outside_graph(scores)
        return scores, torch.cat([c[1] for c in calls])

    def __getitem__(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores [T, E], indices [T, k])`` of one router."""
        if not isinstance(name, str):
            raise ArgumentTypeError(f"RouterScores are read by router name (a str, one of .names), got {name!r:.60}")
        if name not in self._calls:
            raise UnknownRouterError(f"no router named '{name}'; the routers are {list(self.names)}")
        return self._get(name)

    def _choice_scores(self, name: str) -> torch.Tensor:
        """``[T, E]`` detached: what one router's top-k picked from, whose top-k is its free choice (the masked
        copy of a group-limited router's scores, where its group mask leaves out experts; else the scores)."""
        self._get(name)  # (a router that made no decision: the error that says so)
        parts = [(c[2] if c[2] is not None else c[0].detach()) for c in self._calls[name]]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @property
    def scores(self) -> list[torch.Tensor]:
        """Per router, the ``[T, E]`` scores its decision was made on (with gradients).

        Raises:
            InvalidArgumentError: with gradients on, scores kept in the forward of a reentrant
                activation checkpoint, which has none (a loss on them would give the routers none).
        """
        out = [self._get(n)[0] for n in self.names]
        bad = [n for n, s in zip(self.names, out, strict=True) if _outside_graph(s)]
        if bad:
            raise _outside_graph_error(f"the scores of router '{bad[0]}' were")
        return out

    @property
    def indices(self) -> list[torch.Tensor]:
        """Per router, the ``[T, k]`` experts the forward used."""
        return [self._get(n)[1] for n in self.names]

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[str]:
        """The router names, as a mapping's keys (``kept[name]`` reads one)."""
        return iter(self.names)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._calls

    def __repr__(self) -> str:
        tokens = [sum(int(c[0].shape[0]) for c in self._calls[n]) for n in self.names]
        return f"RouterScores(routers={len(self.names)}, tokens={tokens})"


def load_balancing_loss(
    probs: torch.Tensor | Sequence[torch.Tensor],
    indices: torch.Tensor | Sequence[torch.Tensor],
    *,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch/Mixtral load-balancing loss from the experts used and the current router probabilities.

    For each router, ``E * sum_e f_e * P_e``, where ``f_e`` is the number of (token, slot)
    assignments to expert ``e`` divided by the number of tokens (so ``sum_e f_e = k``) and
    ``P_e`` the mean probability of ``e`` over the tokens; the result is the mean over
    routers. It is 1 per slot (``k`` in all) when routing is uniform. This is the formula of
    transformers' ``load_balancing_loss_func`` (models/mixtral/modeling_mixtral.py) for one
    layer; that function pools the tokens of all layers into one count instead of averaging
    per layer, and re-runs top-k on the logits. Divide by ``k`` for Megatron's normalisation.

    Models' own aux losses re-run top-k on the router logits, so they do not follow the
    replay: use this one, with ``probs`` and ``indices`` from :meth:`Session.keep_scores`.

    Args:
        probs: ``[T, E]`` router probabilities (one tensor, or one per router); gradients
            flow through them. Pass ``scores.softmax(-1)`` for routers whose top-k runs on
            logits.
        indices: ``[T, k]`` experts each token used (one tensor, or one per router), on any
            device (``Routes.layer(name)`` is on the host): they are moved to ``probs``' device.
        mask: optional ``[T]`` (or any shape with ``T`` elements) weights of the tokens to
            count, e.g. the attention mask; padding gets 0. A router with no token counted (all
            padding, or no token at all) contributes 0.

    Returns:
        A scalar float32 tensor.

    Raises:
        InvalidArgumentError: shapes that do not match or hold no expert (k or E of 0), indices
            that are not integers, probs that are not floating point, probs that are scores kept
            (with gradients on) in the forward of a reentrant activation checkpoint, which has no
            gradients, or (on the CPU) indices that are not experts ``0..E-1`` or repeat an expert in a counted row,
            probs that are negative (logits) or not finite, a mask with negative or non-finite
            weights. On an accelerator, and in compiled code, out-of-range indices stop the
            kernel that counts them instead, and the other values are not checked (no host
            sync is spent on the checks).
        ArgumentTypeError: ``probs``, ``indices`` or ``mask`` that are not tensors.

    Example:
        >>> import torch, moe_replay as mr
        >>> probs = torch.tensor([[0.7, 0.3], [0.6, 0.4]])
        >>> mr.load_balancing_loss(probs, torch.tensor([[0], [0]]))  # 2 * (1.0 * 0.65 + 0.0 * 0.35)
        tensor(1.3000)
    """
    probs, indices = _tensors(probs, "probs"), _tensors(indices, "indices")
    bad = [i for i, p in enumerate(probs) if _outside_graph(p)]
    if bad:
        raise _outside_graph_error(f"probs of router {bad[0]} are scores")
    if len(probs) != len(indices) or not probs:
        raise InvalidArgumentError(
            f"load_balancing_loss takes one probability tensor per index tensor, got {len(probs)} and {len(indices)}"
        )
    if mask is not None and not isinstance(mask, torch.Tensor):
        raise ArgumentTypeError(f"mask must be a tensor of token weights, got {type(mask).__name__}")
    losses = []
    for i, (p, idx) in enumerate(zip(probs, indices, strict=True)):
        if p.device.type == "cpu":
            idx = idx.cpu()  # checked below at no cost
        if p.dim() != 2 or idx.dim() != 2 or p.shape[0] != idx.shape[0]:
            raise InvalidArgumentError(
                f"router {i}: probs must be [tokens, experts] and indices [tokens, k] with the same tokens, "
                f"got {tuple(p.shape)} and {tuple(idx.shape)}"
            )
        t, e = p.shape
        if idx.shape[1] == 0 or e == 0:  # (the formula would give 0 and no gradient: no decision was counted)
            raise InvalidArgumentError(
                f"router {i}: a router picks k >= 1 of E >= 1 experts per token, got indices {tuple(idx.shape)} over "
                f"probs {tuple(p.shape)}"
            )
        if not p.dtype.is_floating_point:
            raise InvalidArgumentError(f"router {i}: probs must be floating-point probabilities, got {p.dtype}")
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise InvalidArgumentError(f"router {i}: indices must be integers (expert numbers), got {idx.dtype}")
        host = p.device.type == "cpu" and not torch.compiler.is_compiling()
        if idx.numel() and idx.device.type == "cpu" and not torch.compiler.is_compiling():
            # on the host at no cost; on an accelerator, or compiled, the kernel refuses them (no sync here)
            low, high = torch.stack([idx.min(), idx.max()]).tolist()
            if low < 0 or high >= e:
                raise InvalidArgumentError(
                    f"router {i}: indices must be experts 0..{e - 1}, got values from {low} to {high} (-1 marks an "
                    "unrecorded row of Routes: select the recorded tokens, or pass a mask and valid rows)"
                )
        if host and p.numel():
            low = float(p.detach().min())
            if not math.isfinite(float(p.detach().sum())) or low < 0:
                got = "a NaN or infinite value" if low >= 0 or not math.isfinite(low) else f"a minimum of {low:.4g}"
                raise InvalidArgumentError(
                    f"router {i}: probs must be probabilities (finite, not negative), got {got}: for scores that are "
                    "logits pass scores.softmax(-1)"
                )
        w = torch.ones(t, device=p.device) if mask is None else mask.reshape(-1).to(p.device, torch.float32)
        if w.shape[0] != t:
            raise InvalidArgumentError(f"mask has {w.shape[0]} elements, but router {i} has {t} tokens")
        if host and mask is not None and w.numel() and not bool(((w >= 0) & w.isfinite()).all()):
            raise InvalidArgumentError("mask must hold token weights, finite and not negative (1 counts, 0 skips)")
        if host and idx.device.type == "cpu" and idx.shape[1] > 1 and t:
            repeats = (idx.sort(dim=1).values.diff(dim=1) == 0).any(dim=1) & (w > 0)
            if bool(repeats.any()):
                raise InvalidArgumentError(
                    f"router {i}: token {int(repeats.nonzero()[0, 0])} uses an expert twice; a token uses k distinct "
                    "experts (zero padding often causes this: give padding weight 0 in mask)"
                )
        total = w.sum().clamp_min(torch.finfo(torch.float32).tiny)  # no token counted: 0, not 0 / 0
        counts = torch.zeros(e, device=p.device).index_add_(
            0, idx.reshape(-1).to(p.device, torch.long), w.repeat_interleave(idx.shape[1])
        )
        f = counts / total
        p_mean = (p.float() * w[:, None]).sum(0) / total
        losses.append(e * (f * p_mean).sum())
    return torch.stack(losses).mean()


def _tensors(value: object, what: str) -> list[torch.Tensor]:
    """One tensor, or a sequence of them, as a list (a clear error for anything else)."""
    if isinstance(value, torch.Tensor):
        return [value]
    need = f"{what} must be a tensor or a list of tensors, one per router"
    if isinstance(value, str | bytes) or not isinstance(value, Iterable) or hasattr(value, "shape"):
        raise ArgumentTypeError(f"{need}; got a {type(value).__name__}")
    out = list(value)
    bad = next((i for i, x in enumerate(out) if not isinstance(x, torch.Tensor)), None)
    if bad is not None:
        raise ArgumentTypeError(f"{need}; {what}[{bad}] is a {type(out[bad]).__name__}")
    return out
