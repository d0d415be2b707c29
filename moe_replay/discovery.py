"""Finding the routers of any ``nn.Module`` MoE.

A router is found by pattern, not by class: its attribute or class name looks like a
router (``gate``, ``router``, ``*TopkRouter``, ``wg`` ...), it owns a ``[num_experts,
hidden]`` weight (or a single ``Linear`` child with ``num_experts`` outputs), and that
expert count agrees with what the surrounding code says (an ``experts`` container,
``num_experts``-like attributes, the model's config). A shared-expert gate
(``Linear(hidden, 1)``) and an MLP's ``gate_proj`` fail these tests.

``include=`` and ``exclude=`` override the patterns; they take names, globs, regexes,
classes, predicates, or a list of those. :class:`Adapter` says how to intercept a
router family that the generic path gets wrong.
"""

from __future__ import annotations

import dataclasses
import dis
import fnmatch
import functools
import inspect
import math
import re
import sys
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, Union, cast

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._checks import frozen_value, is_collection, is_integer, is_one_of
from .errors import ArgumentTypeError, InvalidArgumentError, MoEReplayError, RouterNotFoundError
from .intercept import DECISIONS

__all__ = ["Adapter", "Matcher", "RouterSite", "find_routers", "format_sites"]

Matcher = Union[str, re.Pattern[str], type, Callable[[str, nn.Module], bool], Iterable[Any]]
"""What ``include=`` / ``exclude=`` accept: a module path or glob (``"layers.*.gate"``),
a compiled regex, a module class, a predicate ``(name, module) -> bool``, or a list of those."""

_EXPERT_KEYS = (
    "num_experts",
    "n_routed_experts",
    "num_local_experts",
    "moe_num_experts",
    "n_experts",
    "num_routed_experts",
    "expert_count",
    "num_total_experts",
    "num_moe_experts",
    "experts_num",
    "expert_num",
    "num_global_experts",
    "global_expert_num",
    "unshared_experts",
)
#: counts of shared experts (ones every token runs, which no router scores)
_SHARED_KEYS = ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts", "shared_experts")
#: the attributes a module keeps its config under (``args``: MegaBlocks, mistral-inference; ``_config``: Fast-LLM)
_CONFIG_ATTRS = ("config", "args", "_config")
_TOPK_KEYS = (
    "top_k",
    "num_experts_per_tok",
    "moe_top_k",
    "moe_topk",
    "topk",
    "num_experts_per_token",
    "experts_per_token",
    "num_selected_experts",
    "n_activated_experts",
    "num_activated_experts",
    "router_topk",
    "top_k_experts",
    "moe_k",
    "k",
)
_NESTED_CONFIGS = ("text_config", "ffn_config", "moe_config", "language_config", "llm_config")

_NAME_HIT = re.compile(r"(router|gate|gating|^wg$|^switch$)", re.I)
_NAME_MISS = re.compile(r"(proj|_up|up_|shared|norm|act|_fn|expert|attn|lora)", re.I)
#: the misses that still rule out a name that says ``router``: attention (``attn``) is no miss beside it, as an
#: ``attn_router`` (an attention-MoE router beside the FFN one) is a router, where an ``attn_gate`` gates attention
_ROUTER_NAME_MISS = re.compile(r"(proj|_up|up_|shared|norm|act|_fn|expert|lora)", re.I)
_CLASS_HIT = re.compile(r"(router|gate|gating)", re.I)
_CLASS_MISS = re.compile(r"(mlp|expert|attention|decoder|layer$|block|proj|norm|activation|gated|glu)", re.I)


@frozen_value()
@dataclass(frozen=True)
class Adapter:
    """How to intercept routers that the generic path gets wrong.

    Args:
        name: short label shown in ``find_routers`` tables.
        match: predicate ``(name, module) -> bool`` selecting the routers it applies to.
        scope: ``"router"`` intercepts the router's own forward; ``"parent"`` the module
            that holds it (for a bare ``Linear`` gate whose top-k runs in the MoE block).
        decision: which calls may be the decision: ``"auto"`` (any, established by effect),
            ``"topk"``, ``"argmax"``, ``"max"`` (only calls of that function), or ``"lookup"``
            (hash routing: the experts are read from a ``[vocab, k]`` integer table).
        unsupported: a reason; routers it matches are refused at ``attach`` with it.
        call: the decision is decision-like call number ``call`` (0-based, in call order) of
            the scope's forward, as listed by a refusal or by ``verify()``; for forwards where
            moe_replay cannot tell which call decides.

    Raises:
        ArgumentTypeError: ``name`` or ``unsupported`` is not a str, ``match`` is not a predicate
            of ``(name, module)``.
        InvalidArgumentError: ``scope`` or ``decision`` is none of its choices, ``call`` is not an
            int >= 0.

    Example:
        >>> import moe_replay as mr
        >>> ad = mr.Adapter("my-gate", match=lambda n, m: n.endswith(".wg"), scope="parent")
    """

    name: str
    match: Callable[[str, nn.Module], bool]
    scope: str = "router"
    decision: str = "auto"
    unsupported: str | None = None
    call: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise ArgumentTypeError(f"Adapter name must be a str (a label for tables), got {self.name!r:.60}")
        if not callable(self.match) or isinstance(self.match, nn.Module):  # (a module is callable, on its inputs)
            raise ArgumentTypeError(
                f"Adapter match must be a predicate (name, module) -> bool, got {self.match!r:.60} "
                f"({type(self.match).__name__}); for router modules, names or globs pass include= to attach or "
                "find_routers"
            )
        _check_predicate(self.match)
        if not is_one_of(self.scope, ("router", "parent")):
            raise InvalidArgumentError(f"Adapter scope must be 'router' or 'parent', got {self.scope!r}")
        if not is_one_of(self.decision, DECISIONS):
            raise InvalidArgumentError(f"Adapter decision must be one of {'/'.join(DECISIONS)}, got {self.decision!r}")
        if self.unsupported is not None and not isinstance(self.unsupported, str):
            raise ArgumentTypeError(
                f"Adapter unsupported must be None or a reason (a str) the matched routers are refused with, got "
                f"{self.unsupported!r:.60} ({type(self.unsupported).__name__})"
            )
        if self.call is not None:
            if not is_integer(self.call) or int(self.call) < 0:
                raise InvalidArgumentError(
                    f"Adapter call must be None or the number (an int >= 0, counted from 0 in call order) of a "
                    f"decision-like call, as a refusal or verify() lists them; got {self.call!r:.60}"
                )
            object.__setattr__(self, "call", int(self.call))  # (a numpy integer or a 0-d tensor as the int it holds)

    def _matches(self, name: str, module: nn.Module) -> bool:
        """Does this adapter apply to the module ``name``? ``match``'s answer read as a truth value.

        Raises:
            ArgumentTypeError: ``match`` answered a value of no single truth value (a tensor or an array
                of several elements) or one whose truth value is its length (a str, a list), or raised
                (``module.top_k`` read from a module that has none: it is asked of the modules discovery looks
                at, of any class), its error chained, as an ``include=`` predicate's is.
        """
        try:
            answer = self.match(name, module)
        except MoEReplayError:
            raise
        except Exception as exc:  # (the user's code: its error is chained, under ours)
            raise ArgumentTypeError(
                f"Adapter {self.name!r}: match raised {type(exc).__name__}: {exc} (on module '{name}', a "
                f"{type(module).__name__}); match is asked of the modules discovery looks at, of any class, so it "
                "must answer True or False for any module (read attributes with getattr(module, 'top_k', None))"
            ) from exc
        _check_answer(answer, f"Adapter {self.name!r}: match({name!r}, module)")
        try:
            return bool(answer)
        except (RuntimeError, ValueError):  # (torch's and numpy's "ambiguous" truth value of several elements)
            raise ArgumentTypeError(
                f"Adapter {self.name!r}: match({name!r}, module) returned a {type(answer).__name__} of no single "
                "truth value; the predicate must return a bool (for a tensor, bool(t.any()) or bool(t.all()))"
            ) from None


def _check_answer(answer: object, what: str) -> None:
    """Refuse a predicate's answer whose truth value is its length, not what it holds: a str (``"False"``), a list
    (``[False]``), a tuple, a dict or a set is true wherever it is not empty, so such a predicate would take every
    module it is asked of. Tensors and arrays are read as the one value they hold (several values are refused by
    their own truth value); ``None`` and a regular-expression match are read as they are.

    Raises:
        ArgumentTypeError: ``answer`` is such a container, named with ``what``.
    """
    if isinstance(answer, str | bytes | Sequence | Mapping | AbstractSet) and not isinstance(answer, torch.Tensor):
        raise ArgumentTypeError(
            f"{what} returned {answer!r:.60} ({type(answer).__name__}), whose truth value is whether it is empty, "
            "not what it says (a non-empty str or list, 'False' or [False], is true): the predicate must return "
            "True or False"
        )


def _check_predicate(match: Callable[..., Any]) -> None:
    """Refuse a ``match`` that cannot be called with ``(name, module)`` (a predicate of one argument): it would
    raise Python's own TypeError at the first module discovery looks at, naming no Adapter."""
    try:
        signature = inspect.signature(match)
    except (TypeError, ValueError):  # (a builtin or C callable of no signature: called as it is)
        return
    try:
        signature.bind("name", object())
    except TypeError:
        raise ArgumentTypeError(
            f"Adapter match must take two arguments, (name, module), as in match=lambda name, module: "
            f"name.endswith('.gate'); got {getattr(match, '__qualname__', match)!r:.80} with the signature "
            f"{signature}"
        ) from None


def _class_forward(module: nn.Module) -> Any:
    """The ``forward`` of a module's class as stored, read without running a descriptor: a scripted module's
    class holds one that raises when read from the class (``RecursiveScriptModule.forward``)."""
    return inspect.getattr_static(type(module), "forward", None)


def _scripted(router: nn.Module, scope: nn.Module) -> str | None:
    """Why a router whose scope runs as TorchScript (``torch.jit.script(gate)`` before attach, or a scripted
    block around a bare gate) cannot be replayed, else None. (A scripted gate whose top-k runs in an eager block
    is intercepted in the block.)"""
    if not isinstance(scope, torch.jit.ScriptModule):
        return None
    which = "it" if scope is router else "the block that holds it"
    return (
        f"{which} is a TorchScript module (torch.jit.script): its forward runs in TorchScript, where no "
        "decision can be seen, recorded or forced. Attach to the eager module (script it after the replay "
        "work, or not at all)"
    )


def _is_plain_linear(name: str, module: nn.Module) -> bool:
    return _class_forward(module) is nn.Linear.forward


def _is_sparsemixer(name: str, module: nn.Module) -> bool:
    return "phimoe" in type(module).__name__.lower() and "router" in type(module).__name__.lower()


def _has_expert_table(name: str, module: nn.Module) -> bool:
    """A hash router: it owns an integer ``[vocab, k]`` table of expert ids (DeepSeek-V4).

    Narrower than the experts it chooses from (a ``[steps, E]`` history of loads is no table).
    """
    w = _own_weight(module)
    experts = int(w.shape[0]) if w is not None and w.dim() == 2 else None
    return any(
        b.dim() == 2
        and not b.dtype.is_floating_point
        and b.dtype != torch.bool
        and b.shape[0] > b.shape[1]
        and (experts is None or b.shape[1] < experts)
        for b in module.buffers(recurse=False)
    )


#: Adapters tried after the user's, first match wins.
BUILTIN_ADAPTERS: tuple[Adapter, ...] = (
    Adapter(
        "phimoe-sparsemixer",
        match=_is_sparsemixer,
        unsupported="PhiMoE's sparsemixer picks experts by iterative masked argmax with a "
        "straight-through estimator; its weights are not a gather of scores at the chosen experts, "
        "so replay cannot be exact",
    ),
    Adapter("hash-table", match=_has_expert_table, decision="lookup"),
    Adapter("linear-gate", match=_is_plain_linear, scope="parent"),
)


#: Used for a product-key gate (Doge's CDMoE, PEER): see :func:`_product_key_experts`.
_PRODUCT_KEY = Adapter(
    "product-key",
    match=lambda n, m: False,
    unsupported="product-key routing picks experts by a top-k over sums of two half-key top-k scores; "
    "an expert outside the candidate products has no score to gather, so replay cannot be exact",
)


def _product_key_experts(module: nn.Module, parent: nn.Module | None) -> int | None:
    """E when ``module`` is a gate scoring two halves of sqrt(E) keys beside E experts held as
    embedding rows (a product-key MoE), else None."""
    out = getattr(module, "out_features", None)
    if parent is None or not isinstance(out, int) or any(isinstance(c, nn.ModuleList) for c in parent.children()):
        return None  # (a parent holding a list of layers is a model with token embeddings, not a block)
    rows = [m.num_embeddings for m in parent.children() if isinstance(m, nn.Embedding)]
    return next((n for n in set(rows) if rows.count(n) >= 2 and n >= 4 and out == 2 * math.isqrt(n)), None)


#: Used when a router's forward cannot reach any decision call (it returns scores only).
_BLOCK_DECISION = Adapter("block-decision", match=lambda n, m: False, scope="parent")
_GENERIC = Adapter("generic", match=lambda n, m: False)  # (what a refusal of a router no adapter matched names)

_SOFT = (
    "soft routing: its block weights every expert and calls no topk, argmax, max or sort, so it makes no "
    "expert choice; soft routing has no expert choice to record or replay. If it does choose experts, it does "
    "so where moe_replay cannot see (a custom operator, TorchScript, numpy or Python lists, a random draw such "
    "as torch.multinomial, a threshold): choose them with torch.topk (or argmax) in the block's Python code, "
    "or name the module that does with include="
)

_DECISION_NAMES = frozenset({"topk", "argmax", "max", "argmin", "min", "sort", "argsort", "kthvalue"})


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:  # comprehensions, lambdas, nested functions
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


_CALL_OPS = frozenset({"CALL", "CALL_FUNCTION", "CALL_METHOD", "CALL_KW", "CALL_FUNCTION_KW", "CALL_FUNCTION_EX"})


def _values_read(code: types.CodeType, scope: Mapping[str, Any]) -> set[str]:
    """The decision names ``code`` reads only as values, never as a torch call: an attribute of what a call returned
    (a dtype's limits, ``torch.finfo(scores.dtype).min``, the fill of an attention mask), or Python's builtin ``min``
    / ``max`` (of sizes: ``min(seq_len, self.window)``; no torch call, so no decision moe_replay could see), where
    ``scope``, the globals of the code, binds no function of that name. Nested code (comprehensions, lambdas)
    included."""
    read: set[str] = set()
    other: set[str] = set()
    stack = [code]
    while stack:
        current = stack.pop()
        stack.extend(c for c in current.co_consts if isinstance(c, types.CodeType))
        previous = ""
        for ins in dis.get_instructions(current):
            if ins.opname == "CACHE":
                continue
            if isinstance(ins.argval, str) and ins.argval in _DECISION_NAMES:
                # (from 3.12, a method load is a LOAD_ATTR with the low bit of its arg set)
                method = ins.opname == "LOAD_METHOD" or (
                    ins.opname == "LOAD_ATTR" and sys.version_info >= (3, 12) and bool((ins.arg or 0) & 1)
                )
                value = ins.opname == "LOAD_ATTR" and not method and previous in _CALL_OPS
                builtin = ins.opname in ("LOAD_GLOBAL", "LOAD_NAME") and ins.argval not in scope
                (read if value or builtin else other).add(ins.argval)
            previous = ins.opname
    return read - other


def _reaches_decision(fn: Any, owner: type, depth: int = 0, instance: Any = None, called: bool = False) -> bool:
    """Can ``fn`` (a router's forward) call a top-k, argmax or max, directly or through the
    methods of its class, the attributes of ``instance`` and the module-level functions it calls?
    True when it cannot be told (no Python code to read): only a router proven to return scores
    alone is widened to its block. ``called``: a decision name read only as the attribute of a call's result (a
    dtype's ``finfo(...).min``) or a builtin ``min`` / ``max`` of Python values is no call of one.
    """
    fn = inspect.unwrap(fn)
    code = getattr(fn, "__code__", None)
    if code is None:
        return True
    names = _code_names(code)
    scope = getattr(fn, "__globals__", {})
    if names & _DECISION_NAMES and not (called and not (names & _DECISION_NAMES) - _values_read(code, scope)):
        return True
    if depth >= 3:
        return False
    for name in names:
        targets = [scope[name]] if name in scope else [k.__dict__.get(name) for k in owner.__mro__]  # super() too
        if instance is not None and name not in scope:  # what the forward reaches as ``self.<name>``
            targets.append(inspect.getattr_static(instance, name, None))
            if _held_reaches_decision(_held(instance, name), names, depth, called):
                return True
        for target in targets:
            if _opaque_call(target) or (
                isinstance(target, types.FunctionType) and _reaches_decision(target, owner, depth + 1, instance, called)
            ):
                return True
    return False


def _held(instance: Any, name: str) -> Any:
    """The object ``instance`` holds as ``self.<name>`` (a submodule or a plain helper object of the model's own
    code), or None: tensors, functions, classes and objects of torch or the standard library are no helpers."""
    held = instance._modules.get(name) if isinstance(instance, nn.Module) else None
    if held is None:
        held = inspect.getattr_static(instance, name, None)
    if held is None or isinstance(held, (torch.Tensor, type, types.FunctionType, types.MethodType, types.ModuleType)):
        return None
    root = (type(held).__module__ or "").split(".")[0]
    return None if root in ("torch", "builtins", "functools", "collections", "typing") else held


def _held_reaches_decision(held: Any, names: set[str], depth: int, called: bool = False) -> bool:
    """Does a method of ``held`` that the forward names (``self.routing_method.apply(logits)``: a routing object's
    method called by name, not through ``forward``) reach a decision call? The method's own class and the object's
    attributes are followed as for a forward."""
    if held is None or depth >= 3:
        return False
    for method in names:
        fn = inspect.getattr_static(type(held), method, None)
        fn = getattr(fn, "__func__", fn)  # (a staticmethod or classmethod)
        if (
            isinstance(fn, types.FunctionType)
            and not (fn.__module__ or "").startswith("torch")  # (nn.Module's own methods: no decision)
            and _reaches_decision(fn, type(held), depth + 1, held, called)
        ):
            return True
    return False


def _opaque_call(target: Any) -> bool:
    """Is ``target`` something a forward calls whose choice of experts cannot be read from its names: an
    ``autograd.Function`` whose ``forward`` reaches a decision, torch's own decision function kept under
    another name (``self.pick = torch.topk``, a ``functools.partial`` of it), or a callable with no Python
    code to read (a custom operator, a TorchScript function)?"""
    if isinstance(target, functools.partial):
        return _opaque_call(target.func) or (
            isinstance(target.func, types.FunctionType) and _reaches_decision(target.func, type(target), 1)
        )
    if isinstance(target, type):
        forward = target.__dict__.get("forward")
        return (
            issubclass(target, torch.autograd.Function)
            and isinstance(forward, (staticmethod, types.FunctionType))
            and _reaches_decision(getattr(forward, "__func__", forward), target, 1)
        )
    if isinstance(target, types.BuiltinFunctionType):
        return getattr(target, "__name__", None) in _DECISION_NAMES
    return (
        callable(target)
        and not isinstance(target, (types.FunctionType, types.MethodType, types.ModuleType, nn.Module))
        and getattr(inspect.unwrap(target), "__code__", None) is None
        and (type(target).__module__ or "").startswith("torch")  # a custom op, a TorchScript function
    )


def _soft_block(block: nn.Module, gate: nn.Module) -> bool:
    """A block that holds only its gate and experts, and whose forward can reach no decision call, nor the forward
    of any of its children but the gate (a fused experts layer passed the gate's logits, as vLLM's ``FusedMoE``, makes
    the choice in its own forward)."""
    others = [
        c
        for n, c in block.named_children()
        if c is not gate and "expert" not in n.lower() and not isinstance(c, nn.Dropout)
    ]
    return (
        not others
        and not _reaches_decision(type(block).forward, type(block), instance=block)
        and not any(c is not gate and _reaches_decision(type(c).forward, type(c), instance=c) for c in block.children())
    )


def _names_in(fn: Any) -> set[str]:
    code = getattr(inspect.unwrap(fn), "__code__", None) if fn is not None else None
    return _code_names(code) if code is not None else set()


def _early_caller(gate: str, block: str, modules: dict[str, nn.Module]) -> str | None:
    """The module that calls a block's gate itself and takes the decision, the block then passed the weights and
    ids (an early router in the decoder layer), else None: the block's forward does not name its gate, and the
    forward of the block's holder names both the block and the gate and can reach a top-k."""
    if not block:
        return None
    attr, held = gate.rsplit(".", 1)[-1], block.rsplit(".", 1)[-1]
    if attr in _names_in(_class_forward(modules[block])):
        return None
    caller = _holder(block, modules)
    outer = modules.get(caller)
    if outer is None or not {attr, held} <= _names_in(_class_forward(outer)):
        return None
    return caller if _reaches_decision(_class_forward(outer), type(outer), instance=outer) else None


@frozen_value(
    "it describes a router as find_routers found it; to set what is found, pass top_k=, num_experts=, include=, "
    "exclude= or adapters= to find_routers or attach"
)
@dataclass(frozen=True)
class RouterSite:
    """One router found in a model.

    Attributes:
        name: module path of the router (``model.get_submodule(name)``).
        module_class: class name of the router module.
        num_experts: expert count E (the width of its scores), as discovery reads it; the
            router's decision confirms or corrects it at its first forward.
        top_k: experts chosen per token, as discovery reads it (None: not said by any
            attribute; learned from the decision at the router's first forward).
        scope: module path whose forward is intercepted (the router, or its MoE block).
        decision: which call is the decision (``auto``: topk, or argmax/max when k is 1).
        adapter: ``generic`` or the name of the :class:`Adapter` that applies.
        unsupported: why this router cannot be replayed, or None.
    """

    name: str
    module_class: str
    num_experts: int
    top_k: int | None
    scope: str
    decision: str = "auto"
    adapter: str = "generic"
    unsupported: str | None = None
    call: int | None = None
    module: nn.Module | None = field(default=None, repr=False, compare=False)
    scope_module: nn.Module | None = field(default=None, repr=False, compare=False)

    @property
    def how(self) -> str:
        """One line saying how this router is intercepted."""
        if self.unsupported:
            return f"refused: {self.unsupported}"
        call = {
            "auto": "decision by effect",
            "topk": "topk by effect",
            "argmax": "argmax by effect",
            "max": "max by effect",
            "lookup": "table lookup",
        }.get(self.decision, self.decision)
        if self.call is not None:
            call = f"call #{self.call}"
        where = "its own forward" if self.scope == self.name else f"forward of '{self.scope}'"
        return f"{call} in {where}"


def shared_scope(first: RouterSite, second: RouterSite) -> str:
    """Why two routers whose interception would share one module's forward are refused.

    Where neither router's forward nor that of the module holding both can reach a decision-like call (each
    was widened to its holder for making none: a hash-routed layer, experts merged by a softmax), they make no
    choice to record, which is what the refusal says, rather than the clash of their interceptions.
    """
    scope = second.scope_module
    if (
        first.adapter == second.adapter == _BLOCK_DECISION.name
        and scope is not None
        and not _reaches_decision(type(scope).forward, type(scope), instance=scope)
    ):
        holder = f"'{second.scope}'" if second.scope else f"the model ({type(scope).__name__})"
        return (
            f"routers '{first.name}' and '{second.name}' make no decision-like call (topk, argmax, max, sort) in "
            f"their forwards, nor does the forward of {holder}, which holds them: they choose no experts that "
            "moe_replay can record or replay (hash routing, experts looked up from the token ids; soft routing, "
            "every expert weighted or merged by a softmax). If they do choose experts, choose them with torch.topk "
            "(or argmax) in the Python code of a module's forward and name that module with include="
        )
    return (
        f"routers '{first.name}' and '{second.name}' would both be intercepted in the forward of '{second.scope}'; "
        "exclude one of them or give one an Adapter with scope='router'"
    )


def format_sites(sites: Sequence[RouterSite] | RouterSite) -> str:
    """A plain-text table of routers, as printed by ``python -m moe_replay inspect``.

    One :class:`RouterSite` (``sites[0]``) is a table of one row. Raises ``ArgumentTypeError`` for
    anything but :class:`RouterSite` items (what :func:`find_routers` returns), naming what to pass
    for a model or a session.

    Example:
        >>> import moe_replay as mr
        >>> print(mr.format_sites(mr.find_routers(mr.models.build("linear_gate"))))
        router             class   E  k  intercepted
        --------------------------------------------------------------------------------
        layers.0.mlp.gate  Linear  8  2  decision by effect in forward of 'layers.0.mlp'
        layers.1.mlp.gate  Linear  8  2  decision by effect in forward of 'layers.1.mlp'
    """
    if isinstance(sites, RouterSite):  # (one site picked out of the list: its table of one row)
        sites = [sites]
    if isinstance(sites, nn.Module):
        raise ArgumentTypeError(
            f"format_sites takes the RouterSites find_routers returns, got the model {type(sites).__name__}: "
            "pass mr.find_routers(model)"
        )
    if type(sites).__name__ == "Session" and hasattr(sites, "sites"):
        raise ArgumentTypeError(
            "format_sites takes the RouterSites find_routers returns, got a Session: pass session.sites (or print "
            "session.table())"
        )
    sites = list(sites) if is_collection(sites) or isinstance(sites, AbstractSet) else sites
    if not isinstance(sites, list) or not all(isinstance(s, RouterSite) for s in sites):
        raise ArgumentTypeError(
            f"format_sites takes the RouterSites find_routers returns (a list of them, or one), got {sites!r:.80}"
        )
    rows = [("router", "class", "E", "k", "intercepted")]
    rows += [(s.name, s.module_class, str(s.num_experts), str(s.top_k or "?"), s.how) for s in sites]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4] for r in rows]
    lines.insert(1, "-" * min(max(len(x) for x in lines), 120))
    return "\n".join(lines)


# ----------------------------------------------------------------------- matching
_GLOB_NOT_REGEX = " (a str is a path or glob, matched whole: for a regex pass re.compile(...))"


def _frozen_matcher(spec: Matcher | None) -> Matcher | None:
    """``spec`` with a one-shot iterator (a generator, ``iter([...])``) read into a list, at any depth: a matcher is
    read more than once (by the search, by the session's watch for routers left out), and a second read of a spent
    iterator would match nothing, with no word."""
    if spec is None or isinstance(spec, str | bytes | re.Pattern | type | nn.Module) or callable(spec):
        return spec
    if is_collection(spec) or isinstance(spec, AbstractSet | Mapping):
        return [_frozen_matcher(s) for s in spec]
    return spec


def _matcher_parts(spec: Matcher | None) -> list[Any]:
    """The single matchers of ``spec``, lists flattened."""
    if spec is None:
        return []
    if not isinstance(spec, str | bytes) and (is_collection(spec) or isinstance(spec, AbstractSet | Mapping)):
        return [p for s in cast(Iterable[Any], spec) for p in _matcher_parts(s)]
    return [spec]


def _refuse_module_instances(model: nn.Module, spec: Matcher | None, role: str) -> None:
    """Refuse a module instance among the matchers of ``spec``, naming its path(s) in ``model``.

    Raises:
        ArgumentTypeError: a part of ``spec`` is an ``nn.Module``; the message gives the path to pass instead (or
            says that the module is no part of ``model``).
    """
    for part in _matcher_parts(spec):
        if not isinstance(part, nn.Module):
            continue
        cls = type(part).__name__
        paths = [n for n, m in model.named_modules(remove_duplicate=False) if m is part and n]
        if part is model:
            raise ArgumentTypeError(
                f"{role}= got the model itself ({cls}), which is never a router: name its router modules by path "
                f"or glob ({role}='layers.*.mlp.gate'), by class, or by a predicate (lambda name, module: ...)"
            )
        if paths:
            said = ", ".join(repr(p) for p in paths[:4]) + (f" and {len(paths) - 4} more" if len(paths) > 4 else "")
            where = f"its path{' is' if len(paths) == 1 else 's are'} {said} in {type(model).__name__}"
            example = paths[0]
        else:
            where, example = f"it is no module of {type(model).__name__}", "layers.0.mlp.gate"
        raise ArgumentTypeError(
            f"{role}= got a module instance ({cls}), not a name: {where}. Name it by its path ({role}={example!r}), "
            f"its class ({role}={cls}), or a predicate such as lambda name, module: module is gate"
        )


def _compile_matcher(spec: Matcher | None, role: str = "include/exclude") -> Callable[[str, nn.Module], bool] | None:
    """``spec`` (see :data:`Matcher`) as a predicate ``(name, module) -> bool``; ``role`` names it in errors.

    Raises:
        InvalidArgumentError: an empty pattern (``""``), which names only the model itself, never a router.
        ArgumentTypeError: anything but the :data:`Matcher` forms (a bytes regex and a module instance included).
    """
    if spec is None:
        return None
    if isinstance(spec, str) or (isinstance(spec, re.Pattern) and isinstance(spec.pattern, str) and not spec.pattern):
        if spec == "" or isinstance(spec, re.Pattern):
            raise InvalidArgumentError(
                f"{role}= got an empty pattern ({spec!r}): it names only the model itself (its path is ''), never a "
                f"router. Give module paths or globs, e.g. {role}='layers.*.mlp.gate', or leave {role} unset"
            )
        glob = str(spec)
        return lambda n, m: n == glob or fnmatch.fnmatchcase(n, glob)
    if isinstance(spec, re.Pattern):
        if not isinstance(spec.pattern, str):
            raise ArgumentTypeError(
                f"{role}= got a bytes regex ({spec.pattern!r:.60}); module paths are str: compile a str pattern"
            )
        regex = spec
        return lambda n, m: regex.fullmatch(n) is not None
    if isinstance(spec, type):
        kind = spec
        return lambda n, m: isinstance(m, kind)
    if isinstance(spec, nn.Module):  # (callable, but its forward is no (name, module) predicate)
        raise ArgumentTypeError(
            f"{role}= got a module instance ({type(spec).__name__}); name it by its path ('layers.0.mlp.gate'), its "
            f"class ({type(spec).__name__}), or a predicate such as lambda name, module: module is gate"
        )
    if callable(spec):
        return functools.partial(_call_predicate, spec, role)
    # (not a 0-d array or tensor: one value, no list; a set or a dict's keys are names, whose order does not matter)
    if is_collection(spec) or isinstance(spec, AbstractSet | Mapping):
        spec = list(spec)
        if any(s is None for s in spec):  # (None alone means "no matcher": in a list it would match nothing, unsaid)
            raise ArgumentTypeError(
                f"{role}= lists take names, globs, regexes, classes or predicates; got None in {spec!r:.80}"
            )
        parts = [_compile_matcher(s, role) for s in spec]
        return lambda n, m: any(p(n, m) for p in parts if p is not None)
    raise ArgumentTypeError(
        f"{role}= takes a name, glob, regex, class, predicate or a list of those; got {type(spec).__name__}"
    )


def _call_predicate(predicate: Callable[[str, nn.Module], Any], role: str, name: str, module: nn.Module) -> bool:
    """``bool(predicate(name, module))``, an error in the predicate (or in the truth of what it returned) named."""
    try:
        answer = predicate(name, module)
        _check_answer(answer, f"the {role}= predicate {getattr(predicate, '__name__', repr(predicate))}")
        return bool(answer)
    except ArgumentTypeError:
        raise
    except Exception as exc:  # (the user's code: its error is chained, under ours)
        raise ArgumentTypeError(
            f"the {role}= predicate {getattr(predicate, '__name__', repr(predicate))} raised {type(exc).__name__}: "
            f"{exc} (on module '{name}', a {type(module).__name__}); a predicate takes (name, module) and returns "
            "True or False"
        ) from exc


def _unmatched_patterns(spec: Matcher | None, names: Iterable[str]) -> list[str]:
    """The names, globs and regexes of ``spec`` that match no module path of ``names``, described."""
    names = list(names)
    dead = []
    for part in _matcher_parts(spec):
        if isinstance(part, str):
            hit = any(n == part or fnmatch.fnmatchcase(n, part) for n in names)
        elif isinstance(part, re.Pattern):
            hit = any(part.fullmatch(n) is not None for n in names)
        else:
            continue
        if not hit:
            dead.append(_describe(part))
    return dead


def _describe(spec: Matcher | None) -> str:
    if isinstance(spec, list | tuple | set | frozenset):
        return ", ".join(_describe(s) for s in spec) if spec else repr(spec)
    if isinstance(spec, re.Pattern):
        return f"re:{spec.pattern}"
    if isinstance(spec, type):
        return spec.__name__
    return repr(spec) if isinstance(spec, str) else getattr(spec, "__name__", repr(spec))


# ----------------------------------------------------------------------- attributes
_MODULE_GETATTR = nn.Module.__getattr__
_OBJECT_GETATTRIBUTE = object.__getattribute__


def _own_params(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``list(module.named_parameters(recurse=False))``, read from the module's own table: no generator per module
    and call (discovery reads each module's parameters several times at every attach)."""
    table = vars(module).get("_parameters")
    if table is None:
        return list(module.named_parameters(recurse=False))
    seen: set[int] = set()
    out = []
    for name, p in table.items():
        if p is not None and id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def _own_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The module's own parameters and buffers (not its submodules'), read from its tables as :func:`_own_params`."""
    params, buffers = vars(module).get("_parameters"), vars(module).get("_buffers")
    if params is None or buffers is None:
        return [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    return [t for t in (*params.values(), *buffers.values()) if t is not None]


def _read_attr(obj: Any, key: str) -> Any:
    """``getattr(obj, key, None)``, with a read that raises taken as absent: a config attribute that has no single
    value (transformers' per-layer configs raise on a global read of a value that differs between layers) or a
    property that fails says nothing about the routers, whose own modules hold the value."""
    try:
        return getattr(obj, key, None)
    except Exception:
        return None


def _int_attr(obj: Any, keys: Sequence[str]) -> int | None:
    if obj is None:
        return None
    # a module whose class keeps nn.Module's __getattr__ (and object's __getattribute__): that finds only parameters,
    # buffers and submodules, never an int, so a name in neither its own attributes nor its class is skipped (a miss
    # there raises, at every attach)
    plain = isinstance(obj, nn.Module) and type(obj).__getattr__ is _MODULE_GETATTR
    own = vars(obj) if plain and type(obj).__getattribute__ is _OBJECT_GETATTRIBUTE else None
    for key in keys:
        if own is not None and key not in own and not hasattr(type(obj), key):
            continue
        v = _read_attr(obj, key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _config_int(config: Any, keys: Sequence[str]) -> int | None:
    if config is None:
        return None
    found = _int_attr(config, keys)
    if found is not None:
        return found
    for sub in _NESTED_CONFIGS:
        found = _int_attr(_read_attr(config, sub), keys)
        if found is not None:
            return found
    return None


def _parametrized_original(module: nn.Module, name: str) -> torch.Tensor | None:
    """The stored tensor behind a parametrized ``name``, read without running the parametrization.

    Reading ``module.weight`` runs the parametrization's code: ``spectral_norm`` in training mode
    advances its power iteration there, changing its ``_u``/``_v`` buffers, so discovery would change
    the model (and its outputs). The stored ``original`` has the shape the hint needs for
    shape-keeping parametrizations (``orthogonal``, a scale); of several (``weight_norm``'s ``g`` and
    ``v``), the largest. A hint only: the decision establishes ``E``.
    """
    holder = vars(module).get("_modules", {}).get("parametrizations")
    plist = vars(holder).get("_modules", {}).get(name) if holder is not None else None
    if plist is None:
        return None
    stored = [p for p in vars(plist).get("_parameters", {}).values() if isinstance(p, torch.Tensor)]
    stored += [b for b in vars(plist).get("_buffers", {}).values() if isinstance(b, torch.Tensor)]
    return max(stored, key=lambda t: (t.numel(), t.dim()), default=None)


def _own_weight(module: nn.Module) -> torch.Tensor | None:
    """The router's own weight: ``weight``, a parametrized one, or its only 1-D/2-D parameter."""
    own = dict(_own_params(module))
    w = own.get("weight")
    if w is None and parametrize.is_parametrized(module, "weight"):
        w = _parametrized_original(module, "weight")
    if w is None:
        w = next((p for p in own.values() if p.dim() == 2), None)
    if w is None:
        flat = [p for p in own.values() if p.dim() == 1]
        w = flat[0] if len(flat) == 1 else None
    return w


def _expert_widths(module: nn.Module, counts: set[int]) -> list[int]:
    """Candidate E, best first: from the router's weight, else its Linear layers.

    The weight may be ``[E, hidden]``, transposed ``[hidden, E]``, or flat ``[E * hidden]``
    (then an expert count found nearby divides it). A router that is a small MLP (ZAYA) scores
    experts with its last ``Linear``; a router wrapping one ``Linear`` scores with that one.
    These are hints: the router's decision establishes E at its first forward.
    """
    w = _own_weight(module)
    if w is not None and w.dim() == 2:
        return [int(w.shape[0]), int(w.shape[1])]
    if w is not None and w.dim() == 1:
        return sorted((c for c in counts if c > 1 and w.numel() % c == 0 and w.numel() > c), reverse=True)
    return [int(m.out_features) for m in reversed(list(module.modules())) if isinstance(m, nn.Linear)]


def _decision_width(width: int, counts: set[int], module: nn.Module, parent: nn.Module | None) -> int | None:
    """The width of the score tensor the decision runs over, or None if ``width`` is no router's.

    ``width`` is the router weight's row count. It is accepted when some expert count says so;
    a weight with extra rows is accepted too: rows for shared experts that the decision does not
    choose (the decision then runs over the routed experts only), or a few null experts (zero or
    skip experts) that the decision may choose. A weight of a few whole times an expert count (up
    to four) is a fused projection scoring those experts (Yuan2.0-M32's attention router: query,
    key and value rows for each expert), and the decision runs over the count. A weight narrower than an expert
    count by the shared experts that the router or its block declares scores the routed experts alone (an experts
    list that holds the shared ones too: epfml/llm-baselines), and the decision runs over its rows.
    """
    if width in counts:
        return width
    shared = _shared_count(module, parent)
    for c in sorted(counts):
        if shared and width == c + shared:
            return c
        if shared and width + shared == c and width > 1:
            return width
        if c < width <= 2 * c:
            return width
    return next((c for c in sorted(counts, reverse=True) if c > 1 and width % c == 0 and width <= 4 * c), None)


def _stacked(module: nn.Module, named: bool = False) -> list[int]:
    """First dimensions E of the stacked expert weights ``[E, ...]`` a module holds itself, convolutions aside.

    ``named``: the module is named like an expert container, and any 3-D weight of it counts. Otherwise a
    count needs two 3-D weights of the same E: experts are feed-forward layers, each with an up and a down
    projection (gpt-fast's ``w1``/``w2``, gpt-oss' ``mlp1_weight``/``mlp2_weight``). A lone 3-D weight is
    something else: a raw convolution kernel ``[channels, 1, width]``, a bilinear form, a per-head
    projection, a class's prototypes; counting it as experts made a gate beside it a router.
    """
    if isinstance(module, nn.modules.conv._ConvNd):
        return []
    firsts = [int(p.shape[0]) for _, p in _own_params(module) if p.dim() == 3]
    return firsts if named else sorted({e for e in firsts if e > 1 and firsts.count(e) >= 2})


def _named_experts(attr: str, module: nn.Module) -> bool:
    """Named like an expert container (``experts``, an ``*Experts`` class), not like shared experts."""
    cls = type(module).__name__.lower()
    return ("expert" in attr.lower() or cls.endswith("experts")) and "shared" not in attr.lower() + cls


def _expert_counts(module: nn.Module, parent: nn.Module | None, config: Any) -> set[int]:
    counts = {v for v in (_int_attr(module, (key,)) for key in _EXPERT_KEYS) if v}
    v = _int_attr(parent, _EXPERT_KEYS)
    if v:
        counts.add(v)
    # a block that owns its gate parameter (``router_DE``, ``w_gate``) holds its experts itself
    holders = [h for h in (parent, module if _owns_gate(module) else None) if h is not None]
    for holder in holders:
        # stacked expert weights [E, ...] beside the router (gpt-fast), or held by the block itself (gpt-oss)
        counts.update(_stacked(holder))
        for attr, child in holder.named_children():
            if child is not module:
                counts.update(_stacked(child, _named_experts(attr, child)))
        experts = getattr(holder, "experts", None)
        if isinstance(experts, nn.ModuleList | nn.Sequential):
            counts.add(len(experts))
    for child in parent.children() if parent is not None else ():
        declared = _declared_moe(child) if child is not module else None
        if declared:
            counts.add(declared)  # a sibling MoE layer that declares E and k (TGI's ``DenseMoELayer``)
        v = _int_attr(experts, _EXPERT_KEYS)
        if v:
            counts.add(v)
    v = _config_int(config, _EXPERT_KEYS)
    if v:
        counts.add(v)
    return counts


def _top_k(module: nn.Module, parent: nn.Module | None, config: Any) -> int | None:
    for obj in (module, parent):
        v = _int_attr(obj, _TOPK_KEYS)
        if v:
            return v
    v = _config_int(config, _TOPK_KEYS)
    if v:
        return v
    named = re.search(r"top_?(\d+)", type(module).__name__, re.I)
    if named:
        return int(named.group(1))
    if re.search(r"switch", type(module).__name__, re.I):
        return 1
    return None


def _near_experts(
    module: nn.Module, parent: nn.Module | None, widths: Sequence[int], shared_configs: _SharedConfigs
) -> bool:
    """Does the router say it has experts, or sit beside an expert container?

    A container is a sibling named like ``experts`` or of an ``*Experts`` class, or one
    holding stacked expert weights (a 3-D parameter with one slice per expert, as gpt-fast's
    ``cond_ffn``). This keeps gates that are not routers (a linear-attention ``forget_gate``) out.
    ``shared_configs`` tells the model's config from a block's own (see :func:`_unmoduled_experts`).
    """
    if _int_attr(module, _EXPERT_KEYS):
        return True
    if _owns_gate(module):
        return True
    for attr, child in parent.named_children() if parent is not None else ():
        if child is module:
            continue
        if _named_experts(attr, child):
            return True
        if _runs_experts_only(child):
            return True  # a sibling that runs the experts it holds (ScatterMoE's ``moe_mlp.experts``)
        if any(e in widths for e in _stacked(child)):
            return True
        if _declared_moe(child) in widths:
            return True  # a sibling MoE layer that declares the experts and k the gate's logits are passed to (TGI)
    if parent is not None and any(e in widths for e in _stacked(parent)):
        return True  # the block's own (gpt-oss)
    return _unmoduled_experts(module, parent, widths, shared_configs)


def _shared_count(module: nn.Module, parent: nn.Module | None) -> int | None:
    """The shared experts the router, its block or the block's own config declares, or None."""
    for obj in (module, parent, _own_config(parent)):
        v = _int_attr(obj, _SHARED_KEYS)
        if v:
            return v
    return None


def _forward_names(block: nn.Module, depth: int = 3) -> set[str]:
    """The names a block's forward reads, with those of the methods of its class that it calls (``self._forward``,
    ``self._forward_looped``), ``depth`` calls deep."""
    names: set[str] = set()
    todo = [_class_forward(block)]
    seen: set[int] = set()
    for _ in range(depth + 1):
        found = [n for fn in todo if id(fn) not in seen for n in _names_in(fn)]
        seen.update(id(fn) for fn in todo)
        names.update(found)
        todo = [f for f in (inspect.getattr_static(type(block), n, None) for n in found) if callable(f)]
        todo = [getattr(f, "__func__", f) for f in todo if isinstance(getattr(f, "__func__", f), types.FunctionType)]
    return names


class _SharedConfigs:
    """The configs that modules of more than one class hold (see :data:`_CONFIG_ATTRS`; a nested config counts as
    held by the holder of the config it is nested in): the model's config, which some models hand to every module
    (transformers' ``self.config`` in the model, its attention and its MLP blocks alike), where a block's own config
    (Fast-LLM's MLP config, held by the MLP of each layer) is held by modules of its class alone. Read once, on the
    first question, over the modules discovery walks."""

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        self._modules = modules
        self._shared: set[int] | None = None

    def __contains__(self, config: object) -> bool:
        if self._shared is None:
            holders: dict[int, set[type]] = {}
            for module in self._modules:
                cfg = _own_config(module)
                if cfg is None:
                    continue
                for held in (cfg, *(_read_attr(cfg, key) for key in _NESTED_CONFIGS)):
                    if held is not None:
                        holders.setdefault(id(held), set()).add(type(module))
            self._shared = {key for key, classes in holders.items() if len(classes) > 1}
        return id(config) in self._shared


def _unmoduled_experts(
    router: nn.Module, block: nn.Module | None, widths: Sequence[int], shared_configs: _SharedConfigs
) -> bool:
    """Does ``block`` hold, in no experts module, the experts that ``router`` scores?

    The block declares the expert count E itself (an attribute, or its own config: not the model's, which modules of
    other classes hold too, ``shared_configs``: an attention block handed the model's config, whose per-head gate is
    as wide as the model's expert count, its projections whole blocks of rows per head), E is a width of
    the router, the block's forward reaches a decision call (a torch one it calls: a dtype's ``finfo(...).min`` and a
    builtin ``min`` of sizes are values read), and the forward reads at least two of the block's
    holdings that are split into the experts: 2-D weights (its own, or a child ``Linear``'s) of ``m * N`` rows,
    ``m >= 2`` (LLaMA2-Accessory's flat ``[E * F, d]`` ``w1`` / ``w2`` / ``w3``; Fast-LLM's ``layer_1`` /
    ``layer_2``, chunked), or ``ModuleList`` / ``ModuleDict`` containers of N entries with parameters (mergoo's LoRA
    adapters, ``lora_A`` / ``lora_B`` keyed by index), where N is E or E plus the shared experts the block declares
    (kept among them). Two, as experts are feed-forward layers with an up and a down projection. A candidate that is
    no router is still never replayed: its block's first forward establishes the decision.
    """
    if block is None:
        return False
    config = _own_config(block)
    if config is not None and config in shared_configs:
        config = None  # (the model's)
    declared = {v for obj in (block, config) for v in (_int_attr(obj, (key,)) for key in _EXPERT_KEYS) if v}
    routed = [w for w in widths if w > 1 and w in declared]
    if not routed:
        return False
    names = _forward_names(block)
    shared = _shared_count(router, block) or 0
    held: list[tuple[str, Any]] = [(n, p) for n, p in _own_params(block) if p.dim() == 2]
    for attr, child in block.named_children():
        if child is router or attr not in names:
            continue
        if isinstance(child, nn.ModuleList | nn.ModuleDict):
            held.append((attr, child))
        elif isinstance(weight := getattr(child, "weight", None), torch.Tensor) and weight.dim() == 2:
            held.append((attr, weight))
    for n in {c for w in routed for c in (w, w + shared)}:
        split = [
            attr
            for attr, h in held
            if attr in names
            and (
                (isinstance(h, torch.Tensor) and h.shape[0] % n == 0 and h.shape[0] >= 2 * n)
                or (
                    isinstance(h, nn.ModuleList | nn.ModuleDict)
                    and len(h) == n
                    and all(any(True for _ in c.parameters()) for c in h.children())
                )
            )
        ]
        if len(split) >= 2:
            # (a decision call: not a dtype's ``min`` an attention mask is filled with, nor a builtin ``min`` of sizes)
            return _reaches_decision(_class_forward(block), type(block), instance=block, called=True)
    return False


def _declared_moe(module: nn.Module) -> int | None:
    """E, where ``module`` declares both an expert count and a top-k (TGI's ``DenseMoELayer``: ``n_experts`` and
    ``topk``, its experts in plain lists no module holds): the MoE layer a gate beside it feeds; else None."""
    if _looks_like_router("", module) or any(n and _looks_like_router(n, m) for n, m in module.named_modules()):
        return None  # (a router itself, or an MoE block with a router of its own: the gate beside it feeds no layer)
    count = _int_attr(module, _EXPERT_KEYS)
    return count if count and count > 1 and _int_attr(module, _TOPK_KEYS) else None


def _runs_experts_only(module: nn.Module) -> bool:
    """Holds an expert container and no router of its own: the experts of a block whose gate sits beside it
    (ScatterMoE's ``moe_mlp``), not an MoE block (which a gate beside it, a residual gate, is no router of)."""
    if not any(_named_experts(a, c) for a, c in module.named_children()) or _owns_gate(module):
        return False
    return not any(n and _looks_like_router(n, m) for n, m in module.named_modules())


def _has_experts(module: nn.Module) -> bool:
    """Holds an expert container: a child named like ``experts`` (not shared ones)."""
    return any("expert" in n.lower() and "shared" not in n.lower() for n, _ in module.named_children())


def _owns_gate(module: nn.Module) -> bool:
    """An MoE block that scores experts with a gate *parameter* of its own (``w_gate``, ``gate_weight``), or one
    that declares E experts, holds them as stacked ``[E, ...]`` weights and a selection matrix with E rows or
    columns (sigma-MoE's ``expert_sel`` beside its ``keys`` and ``values``)."""
    own = _own_params(module)
    gate = any(_NAME_HIT.search(n) and not _NAME_MISS.search(n) and p.dim() in (1, 2) for n, p in own)
    if gate and _has_experts(module):
        return True
    count = _int_attr(module, _EXPERT_KEYS)
    return (
        bool(count)
        and count in _stacked(module)
        and any(p.dim() == 2 and count in p.shape and "bias" not in n.lower() for n, p in own)
    )


def _gateless_experts(name: str, module: nn.Module, modules: dict[str, nn.Module]) -> int | None:
    """E, where ``module`` is an MoE block with no gate module, whose forward scores its experts itself and takes the
    top-k (Moirai-MoE: the distances of the tokens to centroids its encoder hands in; a block scoring them against
    learned centroids of its own); else None.

    It holds one expert container of E experts (E as it declares, if it does) and a k, no parameter outside that
    container but at most one of its own that scores them (2-D, with E rows or columns, or as many as the routed
    experts it declares, fewer than E: ProMoE scores all but an unconditional expert that labels pick), no other
    module with parameters but a shared expert, no module named like a router beside or inside it (a gate beside it
    is the router: the block is its scope), and its forward reaches a decision call. Its first forward establishes
    that decision, as any router's. Returns the count it scores."""
    containers = [c for a, c in module.named_children() if _named_experts(a, c)]
    if len(containers) != 1 or not isinstance(containers[0], nn.ModuleList | nn.Sequential):
        return None
    count = len(containers[0])
    declared = _int_attr(module, _EXPERT_KEYS)
    if count < 2 or declared not in (None, count) or not _int_attr(module, _TOPK_KEYS):
        return None
    if any(
        c is not containers[0] and not _shared_expert(a) and any(True for _ in c.parameters())
        for a, c in module.named_children()
    ):
        return None
    # the experts it scores: all of them, or fewer that it declares (routed ones beside an expert that no score
    # picks, as ProMoE's unconditional expert)
    fewer = {v for v in (_int_attr(module, (key,)) for key in _EXPERT_KEYS) if v and 1 < v < count}
    scored = [count, *sorted(fewer)]
    own = [p for _, p in _own_params(module)]
    if len(own) > 1 or any(p.dim() != 2 or not any(c in p.shape for c in scored) for p in own):
        return None
    if own:
        count = next(c for c in scored if c in own[0].shape)
    if any(n and _looks_like_router(n, m) for n, m in module.named_modules()):
        return None
    holder = modules.get(_holder(name, modules)) if name else None
    if holder is not None and any(
        c is not module and (_looks_like_router(a, c) or _owns_gate(c)) for a, c in holder.named_children()
    ):
        return None
    return count if _reaches_decision(_class_forward(module), type(module), instance=module) else None


def _shared_expert(attr: str) -> bool:
    """Named like a shared expert (``shared_expert``, ``shared_experts``): one every token goes through."""
    return "shared" in attr.lower() and "expert" in attr.lower()


def _looks_like_router(name: str, module: nn.Module) -> bool:
    attr = name.rsplit(".", 1)[-1]
    cls = type(module).__name__
    miss = _ROUTER_NAME_MISS if "router" in attr.lower() else _NAME_MISS
    name_hit = bool(_NAME_HIT.search(attr)) and not miss.search(attr)
    class_hit = bool(_CLASS_HIT.search(cls)) and not _CLASS_MISS.search(cls)
    return name_hit or class_hit


def _in_gate_list(name: str, module: nn.Module, modules: dict[str, nn.Module]) -> bool:
    """A module kept in a list or dict named like a router (``self.gates = nn.ModuleList([...])``): the list's name
    is its name, as the list has no forward of its own."""
    parent = _parent_name(name)
    return (
        isinstance(modules.get(parent), nn.ModuleList | nn.ModuleDict)
        and bool(parent)
        and _looks_like_router(parent, module)
    )


def _parent_name(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)


def _holder(name: str, modules: dict[str, nn.Module]) -> str:
    """The module that holds ``name`` and runs it: its parent, past ``ModuleList``-like containers.

    A gate kept in ``self.gates = nn.ModuleList([gate])`` (tutel) belongs to the MoE layer
    that calls ``self.gates[0](x)``, not to the list, which has no forward.
    """
    parent = _parent_name(name)
    while parent and isinstance(modules.get(parent), _CONTAINERS) and not isinstance(modules[parent], nn.Sequential):
        parent = _parent_name(parent)
    return parent


def _nearest_config(name: str, modules: dict[str, nn.Module]) -> Any:
    """The config (``config``, or ``args`` / ``_config`` as MegaBlocks, mistral-inference and Fast-LLM call it)
    nearest above."""
    while True:
        cfg = _own_config(modules.get(name))
        if cfg is not None:
            return cfg
        if not name:
            return None
        name = _parent_name(name)


def _own_config(module: nn.Module | None) -> Any:
    """The config a module keeps itself (see :data:`_CONFIG_ATTRS`), or None."""
    # (a module keeping nn.Module's attribute lookup holds a config in its own attributes or its class: a name in
    # neither is skipped, as a miss raises there, for every module discovery reads)
    plain = isinstance(module, nn.Module) and type(module).__getattr__ is _MODULE_GETATTR
    own = vars(module) if plain and type(module).__getattribute__ is _OBJECT_GETATTRIBUTE else None
    for key in _CONFIG_ATTRS:
        if own is not None and key not in own and not hasattr(type(module), key):
            continue
        cfg = getattr(module, key, None)
        if cfg is not None and not isinstance(cfg, nn.Module | tuple | list | dict | str):
            return cfg
    return None


def _one_router_per_block(sites: list[RouterSite], modules: dict[str, nn.Module]) -> list[RouterSite]:
    """``sites`` less the gates that would be intercepted in the forward of a block that holds, beside them,
    a router deciding in its own forward.

    A block has one router. A gate found beside a router that decides itself (a ``Linear`` named like a
    gate, as wide as the expert count, next to the experts: Gemma 4's ``per_layer_input_gate``) would be
    intercepted in the forward of the whole block, around that router, and refused there as making no
    choice of its own. Routers inside the experts of a block (an MoE of MoE blocks) are not beside its
    gate, and gates sharing one block are left to ``attach``, which refuses them by name. Were a gate
    dropped here a router after all, its decision would run outside every attached router, which the first
    capture or replay forward refuses (see :mod:`moe_replay.orphans`).
    """
    deciding = {_holder(s.name, modules) for s in sites if s.scope == s.name and s.name}
    return [s for s in sites if s.scope == s.name or s.scope not in deciding]


def _one_site_per_scope(sites: list[RouterSite]) -> list[RouterSite]:
    """``sites`` less those that are an earlier one found again at another path: the same router module in the
    same scope module.

    A module shared by several paths (a router tied across layers) is found at each. Where its scope is
    the router itself, its forward is intercepted once and records one row per call, every path's calls
    in order, under its first path; where its scope is the block around it (a bare gate tied across
    layers), each block is a scope of its own and a router of its own. Two other routers in one scope
    stay, and attach refuses them by name.
    """
    seen: set[tuple[int, int]] = set()
    kept = []
    for s in sites:
        key = (id(s.module), id(s.scope_module))
        if key not in seen:
            seen.add(key)
            kept.append(s)
    return kept


def _refuse_lazy(modules: dict[str, nn.Module]) -> None:
    """Refuse a model with parameters not yet materialised (``nn.LazyLinear`` and the other lazy modules).

    Their shapes, a gate's expert count among them, are unknown until the model's first forward, so
    a lazy gate could be neither found nor described; the first forward materialises them.
    """
    lazy = [
        f"'{name}' ({type(m).__name__})"
        for name, m in modules.items()
        if any(nn.parameter.is_lazy(t) for t in _own_tensors(m))
    ]
    if lazy:
        more = " ..." if len(lazy) > 3 else ""
        raise InvalidArgumentError(
            f"parameters not yet materialised (a lazy module) in {', '.join(lazy[:3])}{more}: "
            "their shapes, a router's expert count among them, are unknown until the first forward. Run one forward "
            "of the model (on any example input) before attaching"
        )


# ----------------------------------------------------------------------- the search
def _refuse_containers(
    model: nn.Module,
    include: Matcher | None,
    chosen: list[str],
    modules: dict[str, nn.Module],
    *,
    exclude: Matcher | None,
    adapters: Sequence[Adapter],
) -> None:
    """Refuse an ``include=`` that matched the model itself beside modules inside it (a pattern as broad as
    ``"*"``): the model, and its top-level modules, would each be taken as a router whose forward holds the
    decisions of the modules under it, and the model's forward is no router's."""
    if len(chosen) < 2 or chosen[0] != "":
        return
    top = [n for n in chosen[1:] if "." not in n]
    named = ["'' (the model itself)"] + [f"'{n}' ({type(modules[n]).__name__})" for n in top[:3]]
    try:  # the built-in patterns' routers, as a narrower pattern to suggest
        found = [site.name for site in find_routers(model, exclude=exclude, adapters=adapters)]
    except MoEReplayError:
        found = []
    globs = list(dict.fromkeys(re.sub(r"(?<=\.)\d+(?=\.|$)", "*", n) for n in found))
    hint = (
        f"e.g. include={globs[0]!r} (the built-in patterns find {len(found)} routers: {globs[:3]})"
        if globs
        else "e.g. include='layers.*.mlp.gate', or include=MyRouterClass"
    )
    raise InvalidArgumentError(
        f"include={_describe(include)} matched {len(chosen)} modules of {type(model).__name__}, the model itself "
        f"among them: it matched modules that are not routers ({', '.join(named)}"
        f"{', ...' if len(top) > 3 else ''}). include= takes exactly the modules that make the routing decision "
        "(each router or gate module); a pattern this broad takes the model and its top-level modules as routers. "
        f"Narrow the pattern, {hint}, or leave include unset for the built-in patterns"
    )


def find_routers(
    model: nn.Module,
    include: Matcher | None = None,
    exclude: Matcher | None = None,
    *,
    adapters: Sequence[Adapter] = (),
    top_k: int | None = None,
    num_experts: int | None = None,
) -> list[RouterSite]:
    """Find the MoE routers of ``model``.

    Args:
        model: any ``nn.Module``.
        include: take exactly the modules it matches as routers (names, globs, regexes,
            classes, predicates or a list), instead of the built-in patterns.
        exclude: drop the routers it matches.
        adapters: extra :class:`Adapter` rules, tried before the built-in ones.
        top_k: k for every router, when the model does not say.
        num_experts: E for every router, when its weight does not say.

    Returns:
        One :class:`RouterSite` per router, in module order (unsupported ones included,
        with ``unsupported`` set; ``attach`` refuses those).

    Raises:
        RouterNotFoundError: no router found, or ``include`` matched nothing.
        InvalidArgumentError: ``top_k`` or ``num_experts`` is not a positive int, or ``top_k`` exceeds it.
        ArgumentTypeError: an ``include``/``exclude`` predicate or an adapter's ``match`` raised on a module
            (its error chained) or answered no single truth value.

    Example:
        >>> import moe_replay as mr
        >>> model = mr.models.build("softmax_topk")
        >>> [s.name for s in mr.find_routers(model)][:2]
        ['layers.0.mlp.router', 'layers.1.mlp.router']
    """
    for what, value in (("top_k", top_k), ("num_experts", num_experts)):
        # (a numpy integer or a 0-d integer tensor is the count it holds, as attach's capacity takes it)
        if value is not None and (not is_integer(value) or int(value) < 1):
            raise InvalidArgumentError(f"{what} must be a positive int (or None: read from the model), got {value!r}")
    top_k = None if top_k is None else int(top_k)
    num_experts = None if num_experts is None else int(num_experts)
    if top_k is not None and num_experts is not None and top_k > num_experts:
        raise InvalidArgumentError(f"top_k={top_k} chooses more experts than num_experts={num_experts} has")
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"find_routers takes an nn.Module, got {type(model).__name__}")
    adapters = list(adapters) if is_collection(adapters) else adapters
    if not isinstance(adapters, list) or not all(isinstance(a, Adapter) for a in adapters):
        bad = adapters if not isinstance(adapters, list) else next(a for a in adapters if not isinstance(a, Adapter))
        if isinstance(adapters, Adapter):
            raise ArgumentTypeError(
                f"adapters must be a sequence of mr.Adapter, got one Adapter (name={adapters.name!r}): for one "
                "adapter pass a list, adapters=[adapter]"
            )
        raise ArgumentTypeError(
            f"adapters must be a sequence of mr.Adapter, got {adapters!r:.80}"
            + (
                f" (holding {type(bad).__name__} {bad!r:.40}): build each rule as mr.Adapter(name, match=...)"
                if isinstance(adapters, list)
                else ": pass a list of mr.Adapter rules (leave adapters out for none)"
            )
        )
    include, exclude = _frozen_matcher(include), _frozen_matcher(exclude)
    _refuse_module_instances(model, include, "include")
    _refuse_module_instances(model, exclude, "exclude")
    inc = _compile_matcher(include, "include")
    exc = _compile_matcher(exclude, "exclude")
    if include is not None and not _matcher_parts(include):
        raise InvalidArgumentError(
            f"include={include!r} is empty: it names no module, so no router would be taken. Name the routers "
            "(include='layers.*.mlp.gate'), or leave include unset (None) for the built-in patterns"
        )
    # every path, a module shared by several (a gate tied across layers) at each: the block around each is a scope
    modules = dict(model.named_modules(remove_duplicate=False))
    _refuse_lazy(modules)
    for role, spec in (("include", include), ("exclude", exclude)):
        dead = _unmatched_patterns(spec, modules)
        # (a lone include= that matches nothing is reported below, with the module paths it could have named)
        if dead and (role == "exclude" or len(_matcher_parts(spec)) > 1):
            raise RouterNotFoundError(
                f"{role}={_describe(spec)}: {', '.join(dead)} matched no module of {type(model).__name__}, so "
                + (
                    "the routers it was to name would be left out unsaid"
                    if role == "include"
                    else "the routers it was to leave native would be recorded and forced"
                )
                + f"; module paths look like {[n for n in list(modules)[1:4]]}. Fix or drop the pattern"
                + (_GLOB_NOT_REGEX if any(isinstance(p, str) for p in _matcher_parts(spec)) else "")
            )
    chosen: list[str] = []
    excluded: list[str] = []  # modules that include= named and exclude= took out
    for name, module in modules.items():
        if inc is not None:
            if not inc(name, module):
                continue
        elif not name or isinstance(module, nn.ModuleList | nn.ModuleDict):
            continue  # (a list of gates named ``gates`` has no forward: the gates in it are the routers)
        elif not (
            _looks_like_router(name, module)
            or _in_gate_list(name, module, modules)
            or _owns_gate(module)
            or _gateless_experts(name, module, modules) is not None
        ):
            continue
        if exc is not None and exc(name, module):
            if inc is not None:
                excluded.append(name)
            continue
        chosen.append(name)
    if inc is not None:
        _refuse_containers(model, include, chosen, modules, exclude=exclude, adapters=adapters)

    sites: list[RouterSite] = []
    problems: list[str] = []
    shared_configs = _SharedConfigs(modules.values())
    too_many: dict[str, str] = {}  # routers with fewer experts than a top_k= given
    for name in chosen:
        if any(name.startswith(site.name + ".") for site in sites if site.name):
            continue  # a router inside a router: the outer one holds the decision (an outer module named like a
            # router that is none, as a block class ``SparseRouter`` holding its gate and experts, hides nothing)
        module = modules[name]
        parent = modules.get(_holder(name, modules)) if name else None
        config = _nearest_config(name, modules)
        counts = _expert_counts(module, parent, config)
        gateless = _gateless_experts(name, module, modules) if inc is None else None
        if gateless:  # (its Linear layers are its experts', not a gate's)
            counts.add(gateless)
        if num_experts:
            candidates = [num_experts]
        elif gateless:
            candidates = [gateless]
        else:
            candidates = _expert_widths(module, counts)
        if not candidates:  # a router with no weight of its own (its block scores): an expert count says E
            candidates = sorted(counts, reverse=True)
        width = candidates[0] if candidates else None
        refusal = next((a for a in (*adapters, *BUILTIN_ADAPTERS) if a.unsupported and a._matches(name, module)), None)
        product_key = _product_key_experts(module, parent) if refusal is None else None
        if product_key:
            refusal, counts = _PRODUCT_KEY, {product_key}
        k: int | None
        if refusal is not None and inc is None:  # a known router family that cannot be replayed: report it
            width, k = max(counts, default=width or 0), top_k or _top_k(module, parent, config) or 1
        elif inc is None:
            if not gateless and not _near_experts(module, parent, candidates, shared_configs):
                continue
            given = num_experts
            if counts and given and given not in counts and given not in _expert_widths(module, counts):
                continue  # (an expert count given that neither its weight nor its experts say: refused below)
            if counts:
                width = next((c for c in candidates if c in counts), None) or next(
                    (w for w in (_decision_width(c, counts, module, parent) for c in candidates) if w), None
                )
            elif not _CLASS_HIT.search(type(module).__name__):
                continue
            if width is None or width < 2:
                continue
        elif width is None:
            problems.append(f"'{name}': cannot tell its expert count; pass num_experts=")
            continue
        if refusal is None or inc is not None:
            k = top_k or _top_k(module, parent, config)  # a hint; None: learned from the decision
            # (a width with no expert count beside it is a hint, a Linear's width under include=: only the counts
            # say the router has fewer experts than top_k; num_experts= is checked above)
            if top_k is not None and counts and top_k > max(int(width), *counts):
                too_many[name] = f"'{name}' ({max(int(width), *counts)} experts)"
        adapter = refusal or next((a for a in (*adapters, *BUILTIN_ADAPTERS) if a._matches(name, module)), None)
        if (
            adapter is None
            and name
            and not _owns_gate(module)  # a block with its own gate parameter: its forward holds the decision
            # (a scripted router's decision, if it made one, could not be seen: only one in its block can be)
            and (
                isinstance(module, torch.jit.ScriptModule)
                or not _reaches_decision(_class_forward(module), type(module))
            )
        ):
            adapter = _BLOCK_DECISION  # it only scores: the top-k runs in its MoE block
        scope_name = name
        if adapter is not None and adapter.scope == "parent":
            if not name:
                problems.append(f"'{name}': a bare gate at the root has no parent block to intercept")
                continue
            scope_name = _holder(name, modules)
            if not adapter.unsupported and _is_plain_linear(name, module) and _soft_block(modules[scope_name], module):
                caller = _early_caller(name, scope_name, modules)
                if caller is None:
                    adapter = dataclasses.replace(adapter, unsupported=_SOFT)
                else:  # the block is passed the choice: the module that calls its gate and takes the top-k decides
                    scope_name = caller
        scripted = _scripted(module, modules[scope_name])
        if scripted is not None and not (adapter is not None and adapter.unsupported):
            adapter = dataclasses.replace(adapter or _GENERIC, unsupported=scripted)
        sites.append(
            RouterSite(
                name=name,
                module_class=type(module).__name__,
                num_experts=int(width),
                top_k=int(k) if k else None,
                scope=scope_name,
                decision=adapter.decision if adapter else "auto",
                adapter=adapter.name if adapter else "generic",
                unsupported=adapter.unsupported if adapter else None,
                call=adapter.call if adapter else None,
                module=module,
                scope_module=modules[scope_name],
            )
        )
    sites = _one_site_per_scope(sites)
    if inc is None:
        sites = _one_router_per_block(sites, modules)
    too_many = {n: t for n, t in too_many.items() if any(s.name == n for s in sites)}
    if too_many:
        raise InvalidArgumentError(
            f"top_k={top_k} chooses more experts than these routers have: {', '.join(too_many.values())}; pass the k "
            "the routers choose, or leave top_k unset to read it from their decisions"
        )
    if problems:
        raise RouterNotFoundError("some routers could not be described:\n  " + "\n  ".join(problems))
    if not sites:
        if excluded:
            raise RouterNotFoundError(
                f"include={_describe(include)} matched {len(excluded)} module(s) of {type(model).__name__} "
                f"({excluded[:3]}), and exclude={_describe(exclude)} took every one of them out; narrow exclude= "
                "(it is applied after include=)"
            )
        if include is not None:
            raise RouterNotFoundError(
                f"include={_describe(include)} matched no module of {type(model).__name__}; "
                f"module paths look like {[n for n in list(modules)[1:4]]}"
                + (_GLOB_NOT_REGEX if any(isinstance(p, str) for p in _matcher_parts(include)) else "")
            )
        if exclude is not None:  # (the search found routers, and exclude= took every one out: say so)
            try:
                dropped = find_routers(model, adapters=adapters, top_k=top_k, num_experts=num_experts)
            except MoEReplayError:
                dropped = []
            if dropped:
                raise RouterNotFoundError(
                    f"exclude={_describe(exclude)} took out every router found in {type(model).__name__}: without it, "
                    f"{len(dropped)} router(s) are found ({[d.name for d in dropped[:3]]}"
                    f"{' ...' if len(dropped) > 3 else ''}); narrow exclude= to the modules to leave out"
                )
        if num_experts is not None:  # routers of another expert count than the one given?
            try:
                found = find_routers(model, exclude=exclude, adapters=adapters, top_k=top_k)
            except MoEReplayError:
                found = []
            if found:
                widths = sorted({s.num_experts for s in found})
                raise RouterNotFoundError(
                    f"num_experts={num_experts} is the expert count of no router of {type(model).__name__}: without "
                    f"it, {len(found)} routers are found ('{found[0].name}', ...) with {widths} experts. Leave "
                    "num_experts out (it is for routers whose weight does not say their expert count)"
                )
        cls = type(model).__name__
        itself = (  # (the module given is a router itself: its own path is '', which is no router's path)
            f" {cls} looks like a router itself, and the module given is never one of its routers: attach to the "
            f"model that holds it (mr.attach(model)), or pass include={cls} to intercept it alone."
            if _looks_like_router("", model) or _owns_gate(model)
            else ""
        )
        raise RouterNotFoundError(
            f"no MoE router found in {cls} ({len(modules)} modules scanned).{itself} "
            "Name the router modules with include=, e.g. mr.attach(model, include='layers.*.mlp.gate') "
            "or include=MyRouterClass, and pass top_k=/num_experts= if the modules do not carry them"
        )
    return sites
