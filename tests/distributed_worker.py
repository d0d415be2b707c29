"""Capture and replay under DDP and FSDP2, and moving routes between ranks.

Run by tests/test_distributed.py with 2 CPU processes (gloo), and on 2 GPUs with NCCL:

    PYTHONPATH=. torchrun --standalone --nproc-per-node 2 tests/distributed_worker.py

Every rank prints one line "rank R: ... ok"; any failure raises on the rank that found it.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import importlib
import os
import re
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import moe_replay as mr
from moe_replay.distributed import gather_routes, scatter_routes, split_routes

ATOL = 1e-5


def _batch(rank: int, device: torch.device) -> torch.Tensor:
    """Each rank's own tokens: a different count per rank."""
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randint(0, 128, (2 + rank, 9), generator=g).to(device)


def _perturb(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router.weight"):
                p.add_(3 * p.detach().std().item() * torch.randn(p.shape, generator=g).to(p.device))


def _capture(model: torch.nn.Module, session: mr.Session, x: torch.Tensor) -> mr.Routes:
    with session.capture(), torch.no_grad():
        model(x)
    return session.routes()


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        if hasattr(g, "full_tensor"):  # FSDP2 shards gradients as DTensors
            g = g.full_tensor()
        out[name] = g.detach().clone()
    model.zero_grad(set_to_none=True)
    return out


def _same_grads(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys(), what
    for name, g in want.items():
        assert torch.allclose(got[name], g, atol=ATOL, rtol=0), f"{what}: gradient of {name} differs"


def run_checks(rank: int, world: int, device: torch.device) -> None:
    torch.manual_seed(0)
    model = mr.models.build("softmax_topk", num_layers=3, first_dense_layers=1, expert_impl="dense").to(device)
    batches = [_batch(r, device) for r in range(world)]

    # what every rank's tokens route to, computed here on an unshared copy
    reference = copy.deepcopy(model)
    ref_session = mr.attach(reference)
    expected = [_capture(reference, ref_session, b) for b in batches]

    # DDP: each rank captures its own tokens
    session = mr.attach(model)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    mine = _capture(ddp, session, batches[rank])
    assert mine.equal(expected[rank]), "DDP capture differs from this rank's own forward"

    # gather to rank 0, split back by rank and by batch, scatter back
    parts = gather_routes(mine, dst=0)
    if rank == 0:
        assert parts is not None and len(parts) == world
        assert all(p.equal(e) for p, e in zip(parts, expected, strict=True)), "gathered routes differ"
        everything = mr.Routes.cat(parts)
        again = split_routes(everything, [p.num_tokens for p in parts])
        assert all(a.equal(p) for a, p in zip(again, parts, strict=True))
        per_sequence = split_routes(parts[-1], [batches[-1].shape[1]] * batches[-1].shape[0])
        assert mr.Routes.cat(per_sequence).equal(parts[-1]) and len(per_sequence) == batches[-1].shape[0]
    else:
        assert parts is None
    back = scatter_routes(parts, src=0)
    assert back.equal(mine), "scattered routes differ from what this rank captured"

    # the mean gradient over all ranks' replayed batches, computed here without any wrapper
    _perturb(model)
    _perturb(reference)
    fsdp_model = copy.deepcopy(reference)  # plain forward: the copy has no session
    for b, routes in zip(batches, expected, strict=True):
        with ref_session.replay(routes):
            (reference(b, labels=b).loss / world).backward()
    want = _grads(reference)

    # DDP replay step: gradients are averaged over ranks
    with session.replay(back):
        ddp(batches[rank], labels=batches[rank]).loss.backward()
    _same_grads(_grads(model), want, "DDP")

    # FSDP2: shard every layer and the root, replay this rank's routes
    from torch.distributed.fsdp import fully_shard

    for layer in fsdp_model.layers:
        fully_shard(layer)
    fully_shard(fsdp_model)
    with mr.attach(fsdp_model) as fsdp_session:
        assert _capture(fsdp_model, fsdp_session, batches[rank]).num_tokens == batches[rank].numel()
        with fsdp_session.replay(back), fsdp_session.capture():
            fsdp_model(batches[rank], labels=batches[rank]).loss.backward()
        assert fsdp_session.routes().equal(back), "FSDP2 replay did not force this rank's routes"
    _same_grads(_grads(fsdp_model), want, "FSDP2")
    print(f"rank {rank}: DDP and FSDP2 capture/replay, gather/split/scatter of routes ok ({device})", flush=True)
    check_refusals(rank, world, model, session)
    print(f"rank {rank}: bad inputs to gather/scatter refused on every rank ({device})", flush=True)
    check_group_refusals(rank, world)
    print(f"rank {rank}: groups this rank is not in and disagreeing roots refused ({device})", flush=True)
    check_forwards_travel(rank, model, session)
    print(f"rank {rank}: a capture's forwards travel with its rows ({device})", flush=True)
    check_sharded_inside_scope(rank, device)
    print(f"rank {rank}: a router decided around a module sharded on its own refused ({device})", flush=True)
    check_router_that_communicates(rank, device)
    print(f"rank {rank}: a router whose forward communicates refused ({device})", flush=True)
    check_micro_batches(rank, world, device)
    print(
        f"rank {rank}: DDP no_sync micro-batches replay their own slices; swapped ones refused ({device})", flush=True
    )
    check_split_from_one_rank(rank, world, device)
    print(f"rank {rank}: one rank's capture split unevenly by rank; wrong order refused ({device})", flush=True)
    check_expert_parallel(rank, world, device)
    print(f"rank {rank}: expert parallelism by all_to_all with a replicated router ({device})", flush=True)
    check_fsdp1_units(rank, device)
    print(f"rank {rank}: routes of the bare model replayed in FSDP1 units of each layer ({device})", flush=True)


def _raises(error: type[Exception], match: str, call: Callable[[], object]) -> None:
    try:
        call()
    except error as e:
        assert re.search(match, str(e)), f"{type(e).__name__}: {e} does not match {match!r}"
    else:
        raise AssertionError(f"no {error.__name__} raised")


def check_refusals(rank: int, world: int, model: torch.nn.Module, session: mr.Session) -> None:
    """Bad input on one rank is refused on every rank, with the group still usable after each refusal."""
    a = mr.Routes([torch.zeros(3 + rank, 1, dtype=torch.long)] * 2, names=["a", "b"], num_experts=4)
    more = mr.Routes([torch.zeros(3, 1, dtype=torch.long)] * 3, names=["a", "b", "c"], num_experts=4)
    # a router more on one rank: headers of other sizes once aborted the process inside gloo
    _raises(mr.RoutesValidationError, "different router sets", lambda: gather_routes(more if rank else a))
    _raises(mr.ArgumentTypeError, "Routes", lambda: gather_routes("routes" if rank else a))  # type: ignore[arg-type]
    _raises(mr.InvalidArgumentError, "dst=99 is not a rank", lambda: gather_routes(a, dst=99))
    # the source rank's refusal reaches every rank instead of leaving them waiting in a broadcast
    _raises(mr.InvalidArgumentError, "one Routes per rank", lambda: scatter_routes([a] if rank == 0 else None))
    mixed = [a, *([more] * (world - 1))]
    _raises(mr.RoutesValidationError, "other router sets", lambda: scatter_routes(mixed if rank == 0 else None))
    # names travel whole, whatever characters they hold
    odd = mr.Routes([torch.ones(rank + 1, 1, dtype=torch.long)] * 2, names=["é.gate", "x\ny"], num_experts=4)
    parts = gather_routes(odd)
    assert scatter_routes(parts).equal(odd), "names changed on the way"
    # rows left unchecked (validate=False) stay unchecked: replay checks them after the trip too
    x = _batch(rank, next(model.parameters()).device)
    good = _capture(model, session, x)
    layers = [d.clone() for d in good.per_layer()]
    layers[0][0] = layers[0][0, 0]  # token 0 repeats an expert
    bad = mr.Routes(layers, good.names, good.experts_per_layer, validate=False)
    back = scatter_routes(gather_routes(bad))
    assert back.equal(bad)

    def replay() -> None:
        with session.replay(back), torch.no_grad():
            model(x)

    _raises(mr.RoutesValidationError, "repeats an expert", replay)


def check_group_refusals(rank: int, world: int) -> None:
    """A group this process is not in, or ranks that disagree on the root: refused, never left waiting."""
    a = mr.Routes([torch.zeros(3 + rank, 1, dtype=torch.long)] * 2, names=["a", "b"], num_experts=4)
    # a process outside the group is refused on its own (torch would skip the collective there), the members
    # go on without it; something else than a group is refused before any collective
    last = dist.new_group([world - 1])
    if rank == world - 1:
        got = gather_routes(a, dst=rank, group=last)
        assert got is not None and got[0].equal(a) and scatter_routes(got, src=rank, group=last).equal(a)
    else:
        _raises(mr.InvalidArgumentError, "not a member of the group", lambda: gather_routes(a, group=last))
        _raises(mr.InvalidArgumentError, "not a member of the group", lambda: scatter_routes(None, group=last))
    _raises(mr.ArgumentTypeError, "ProcessGroup", lambda: gather_routes(a, group="world"))  # type: ignore[arg-type]
    if world > 1:
        # ranks that disagree on the root, or one that names no member, are refused on every rank instead
        # of waiting for each other in a collective with two roots
        _raises(mr.InvalidArgumentError, "different dst", lambda: gather_routes(a, dst=rank))
        _raises(mr.InvalidArgumentError, "different src", lambda: scatter_routes([a] * world, src=rank))
        _raises(mr.InvalidArgumentError, "dst", lambda: gather_routes(a, dst=99 if rank else 0))
        _raises(mr.InvalidArgumentError, "src", lambda: scatter_routes([a] * world, src=0 if rank else 99))
    assert scatter_routes(gather_routes(a)).equal(a), "the group is usable after the refusals"


class _Cache(list):
    """A KV cache (the reference model's list of layers) that can reorder its rows, as beam search does."""

    def reorder_cache(self, order: torch.Tensor) -> None:
        self[:] = [(k[order], v[order]) for k, v in self]


def _decode(
    model: torch.nn.Module,
    ids: torch.Tensor,
    prefill: int,
    mask: torch.Tensor | None = None,
    reorder: torch.Tensor | None = None,
) -> None:
    """A prefill of ``ids`` in chunks of ``prefill`` positions, then two decode steps of every sequence.

    ``mask``: the prompt's attention mask. ``reorder``: the cache's rows are put in this order
    between the steps.
    """
    past = _Cache()  # one cache object, updated in place (as transformers' DynamicCache is)
    for at in range(0, ids.shape[1], prefill):
        past[:] = model(
            ids[:, at : at + prefill], past_key_values=past, use_cache=True, attention_mask=mask
        ).past_key_values
    for _ in range(2):
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        past[:] = model(ids[:, :1], past_key_values=past, use_cache=True, attention_mask=mask).past_key_values
        if reorder is not None:
            past.reorder_cache(reorder)


def check_forwards_travel(rank: int, model: torch.nn.Module, session: mr.Session) -> None:
    """What a capture knows of its forwards (which split_generation checks) crosses ranks with its rows."""
    ids = _batch(rank, next(model.parameters()).device)[:2, :4]  # 2 sequences of 4 prompt positions

    def trip(routes: mr.Routes) -> list[mr.Routes]:
        """``routes``, then what scatter gives back of them here, and on rank 0 what gather gave."""
        parts = gather_routes(routes)
        return [routes, scatter_routes(parts), *([parts[rank]] if parts is not None else [])]

    split = functools.partial(mr.split_generation, batch_size=2)
    with session.capture(), torch.no_grad():
        _decode(model, ids, 4)
    plain = session.routes()
    want = split(plain, prompt_len=4)
    seq = torch.cat([ids, ids[:, :1], ids[:, :1], ids[:, :1]], dim=1).cpu()  # the prompt, the tokens fed, one more
    for r in trip(plain):
        assert all(a.equal(b) for a, b in zip(split(r, prompt_len=4), want, strict=True))
        assert all(a.equal(b) for a, b in zip(split(r, prompt_len=4, sequences=seq), want, strict=True))
        # what each row was fed travels too: sequences in another order are refused
        _raises(
            mr.RoutesValidationError,
            "do not hold the prompts",
            lambda r=r: split(r, prompt_len=4, sequences=seq[[1, 0]]),
        )
    # the prompt forward's attention mask: a split without it is refused after the trip too
    with session.capture(), torch.no_grad():
        _decode(model, ids, 4, mask=torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]], device=ids.device))
    for r in trip(session.routes()):
        _raises(mr.RoutesValidationError, "not the attention mask", functools.partial(split, r, prompt_len=4))
    # a cache that moved its rows between the steps (beam search): no split by the row order
    with session.capture(), torch.no_grad():
        _decode(model, ids, 4, reorder=torch.tensor([1, 0], device=ids.device))
    for r in trip(session.routes()):
        _raises(mr.RoutesValidationError, "_Cache.reorder_cache", functools.partial(split, r, prompt_len=4))
    # a prefill in two chunks has the row count of one: refused here, so refused after the trip too
    with session.capture(), torch.no_grad():
        _decode(model, ids, 2)
    for r in trip(session.routes()):
        _raises(mr.RoutesValidationError, "ran forwards of", functools.partial(split, r, prompt_len=4))
    # a keep_newest capture that dropped its oldest rows: they no longer start at the prompt
    other = copy.deepcopy(model)  # (comes out plain)
    with mr.attach(other, capacity=4, keep_newest=True) as newest:
        with newest.capture(), torch.no_grad():
            _decode(other, ids[:, :2], 2)
        cut = newest.routes()
    for r in trip(cut):
        _raises(mr.RoutesValidationError, "keep_newest", functools.partial(split, r, prompt_len=2))
    check_interleaved_loops_travel(model, session, ids, trip)


def check_interleaved_loops_travel(
    model: torch.nn.Module, session: mr.Session, ids: torch.Tensor, trip: Callable[[mr.Routes], list[mr.Routes]]
) -> None:
    """Once silent: two decode loops whose forwards took KV caches in turn (as classifier-free guidance runs
    them) were refused by split_generation on the rank that captured them, but split after a gather or scatter:
    their rows, 8 then 2 per step, fit one generate() of more new tokens."""
    with session.capture(), torch.no_grad():
        cond, uncond = _Cache(), _Cache()
        cond[:] = model(ids, past_key_values=cond, use_cache=True).past_key_values
        uncond[:] = model(ids[:, :1], past_key_values=uncond, use_cache=True).past_key_values
        for _ in range(2):
            cond[:] = model(ids[:, :1], past_key_values=cond, use_cache=True).past_key_values
            uncond[:] = model(ids[:, :1], past_key_values=uncond, use_cache=True).past_key_values
    for r in trip(session.routes()):
        split = functools.partial(mr.split_generation, r, batch_size=2, prompt_len=4)
        _raises(mr.RoutesValidationError, "KV caches in turn", split)


def check_sharded_inside_scope(rank: int, device: torch.device) -> None:
    """A router decided around a module distributed on its own: refused on every rank, or established before.

    The forward that decides runs the experts sharded on their own (as with expert parallelism), or a
    gate split by tensor parallelism; it is refused at its first forward rather than run again on one
    rank alone to establish the decision (FSDP2, tensor parallelism: on its shards, their hooks set
    aside; FSDP1: with a gather the other ranks never join). Established before sharding, as the
    refusal says, it runs.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from moe_replay.models import Experts, _Layer

    x = _batch(rank, device)

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return mr.models.build("linear_gate", num_layers=1, expert_impl="dense").to(device)  # (decided in the block)

    def fsdp2(model: torch.nn.Module) -> torch.nn.Module:
        fully_shard(model.layers[0].mlp.experts)
        fully_shard(model.layers[0])
        fully_shard(model)
        return model

    def fsdp1(model: torch.nn.Module) -> torch.nn.Module:
        policy = ModuleWrapPolicy({Experts, _Layer})
        return FullyShardedDataParallel(model, auto_wrap_policy=policy, use_orig_params=True, device_id=device)

    def tensor_parallel(model: torch.nn.Module) -> torch.nn.Module:  # the gate's columns over the ranks
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        return parallelize_module(model, mesh, {"layers.0.mlp.gate": ColwiseParallel(output_layouts=Replicate())})

    for shard in (fsdp2, fsdp1, tensor_parallel):
        model = shard(build())
        with mr.attach(model):
            # a rank whose micro-batch is empty refuses at the same forward as the others
            first = x[:0] if rank == 0 else x
            _raises(mr.UnsupportedRouterError, "distributed across ranks", functools.partial(model, first))
    model = build()
    with mr.attach(model), torch.no_grad():
        model(x)  # established here, before sharding
    model = fsdp2(model)
    with mr.attach(model) as session:
        routes = _capture(model, session, x)
        with session.replay(routes), session.capture(), torch.no_grad():
            model(x)
        assert session.routes().equal(routes)
    check_router_distributed_itself(rank, device)


def check_router_distributed_itself(rank: int, device: torch.device) -> None:
    """A router module distributed itself: by FSDP2 it runs (its hooks gather its parameters before its forward),
    by tensor parallelism it is refused on every rank at its first forward.

    Split by tensor parallelism, its forward computes on DTensor parameters and inputs, which the probe's own
    plain tensors cannot join, and redistributes them in collectives no mode sees.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return mr.models.build("softmax_topk", num_layers=1, expert_impl="dense").to(device)

    x = _batch(rank, device)
    model = build()
    fully_shard(model.layers[0].mlp.router)
    fully_shard(model)
    with mr.attach(model) as session:
        routes = _capture(model, session, x)
        with session.replay(routes), session.capture(), torch.no_grad():
            model(x)
        assert session.routes().equal(routes), "FSDP2 on the router itself: replay did not force its routes"

    def split(name: str, module: torch.nn.Module, mesh) -> None:  # the experts' rows of its weight over the ranks
        module.weight = torch.nn.Parameter(distribute_tensor(module.weight.data, mesh, [Shard(0)]))

    def replicated(module: torch.nn.Module, inputs: tuple, mesh) -> tuple:
        return tuple(DTensor.from_local(t, mesh, [Replicate()]) for t in inputs)

    def local(module: torch.nn.Module, outputs: tuple, mesh) -> tuple:
        return tuple(o.full_tensor() if isinstance(o, DTensor) else o for o in outputs)

    model = build()
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    distribute_module(model.layers[0].mlp.router, mesh, split, replicated, local)
    same = _batch(0, device)  # (tensor parallelism: the same tokens on every rank)
    with torch.no_grad():
        model(same)  # it runs without a session
    with mr.attach(model):
        _raises(mr.UnsupportedRouterError, "distributed across ranks", functools.partial(model, same))
    _in_step(rank, device, "a router split by tensor parallelism")


def _all_reduce(counts: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(counts)
    return counts


def _functional_all_reduce(counts: torch.Tensor) -> torch.Tensor:
    from torch.distributed import _functional_collectives as funcol

    return funcol.wait_tensor(funcol.all_reduce(counts, "sum", dist.group.WORLD))


def _operator_all_reduce(counts: torch.Tensor) -> torch.Tensor:
    ops = torch.ops._c10d_functional
    return ops.wait_tensor(ops.all_reduce(counts, "sum", dist.group.WORLD.group_name))


#: How a router may sum its expert counts over the ranks: torch.distributed's collective, the functional one
#: (its operator's packet is what the forward calls), that operator called directly.
_SHARES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "all_reduce": _all_reduce,
    "functional all_reduce": _functional_all_reduce,
    "all_reduce operator": _operator_all_reduce,
}


class _CountingRouter(torch.nn.Module):
    """A router that sums its expert counts over the ranks in its forward (as Megatron's does for its
    load-balancing loss under sequence parallelism)."""

    def __init__(self, share: Callable[[torch.Tensor], torch.Tensor], hidden: int = 16, experts: int = 8) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(experts, hidden))
        self.top_k, self.num_experts = 2, experts
        self.share = share
        self.forwards = 0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, experts = torch.topk(torch.softmax(x @ self.weight.t(), dim=-1), self.top_k, dim=-1)
        ones = torch.ones(experts.numel(), device=x.device)
        counts = torch.zeros(self.num_experts, device=x.device).index_add_(0, experts.flatten(), ones)
        self.forwards += 1
        self.tokens_per_expert = self.share(counts)
        return weights, experts


class _CountingMoE(torch.nn.Module):
    def __init__(self, share: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.router = _CountingRouter(share)
        self.experts = torch.nn.Parameter(torch.randn(8, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = self.router(x)
        return x + (weights[..., None] * self.experts[experts]).sum(-2)


def _in_step(rank: int, device: torch.device, what: str) -> None:
    """The ranks' next collectives are one and the same: no rank issued one that the others did not."""
    mine = torch.tensor([float(rank + 1)], device=device)
    dist.all_reduce(mine)
    world = dist.get_world_size()
    assert mine.item() == world * (world + 1) / 2, f"{what}: the ranks' collectives are out of step"


def check_router_that_communicates(rank: int, device: torch.device) -> None:
    """A router whose forward calls a collective is refused on every rank at its first forward.

    Establishing its decision would run that collective again on this rank alone, as many times as
    this rank's tokens take (one token here, many there): the other ranks' next collectives would
    answer it, or none would. So the probe stops at the collective before it runs, whether the forward
    calls torch.distributed's or a functional collective's operator, and a rank with an empty
    micro-batch (nothing to establish) refuses it at the same forward rather than wait in it alone.
    """
    for how, share in _SHARES.items():
        for tokens in ((1, 40), (0, 40)):
            torch.manual_seed(0)
            model = _CountingMoE(share).to(device)
            x = torch.randn(tokens[rank % 2], 16, device=device)
            with mr.attach(model):
                _raises(mr.UnsupportedRouterError, "communicates across ranks", functools.partial(model, x))
            left = hasattr(model.router, "tokens_per_expert") or model.router.forwards
            assert not left, f"{how} on {tokens[rank % 2]} tokens: the refused forward left state behind"
            _in_step(rank, device, f"{how} on {tokens[rank % 2]} tokens")


def spawned(rank: int, world: int, init_method: str) -> None:
    """Entry point for torch.multiprocessing.spawn (CPU, gloo)."""
    torch.set_num_threads(1)
    # a rank left waiting in a collective fails the test within a minute, not gloo's default half hour
    timeout = datetime.timedelta(seconds=60)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world, timeout=timeout)
    try:
        run_checks(rank, world, torch.device("cpu"))
        dist.barrier()  # (no rank tears its group down while another still talks to it)
    finally:
        dist.destroy_process_group()
    _exit_passed()


def spawned_example(rank: int, world: int, init_method: str, module: str) -> None:
    """Entry point for torch.multiprocessing.spawn: the ``spawned`` of the example script ``module`` (imported by
    name from docs/examples, on the path the parent set), ended as :func:`spawned` ends a rank that passed."""
    importlib.import_module(module).spawned(rank, world, init_method)
    _exit_passed()


def _exit_passed() -> None:
    """End a spawned rank whose checks passed without the interpreter's teardown: there, about one run in 25,
    a gloo worker thread of torch's still held work and the rank aborted (``terminate called without an active
    exception``, SIGABRT) after every check had passed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    """Entry point for torchrun: NCCL on one GPU per rank when CUDA is there, else gloo."""
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        run_checks(dist.get_rank(), dist.get_world_size(), device)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()


def check_micro_batches(rank: int, world: int, device: torch.device) -> None:
    """DDP gradient accumulation (``no_sync``, with and without ``find_unused_parameters``): each micro-batch
    replays its own slice of this rank's capture, and the gradients equal a single-process reference; a slice
    replayed on the other micro-batch is refused by its tokens."""
    torch.manual_seed(0)
    model = mr.models.build("softmax_topk", num_layers=2, expert_impl="dense").to(device)
    batches = [_batch(r, device)[:2].repeat(2, 1) + torch.arange(4, device=device)[:, None] for r in range(world)]
    reference = copy.deepcopy(model)
    with mr.attach(reference) as ref_session:
        captured = [_capture(reference, ref_session, b) for b in batches]
        _perturb(reference)
        for b, routes in zip(batches, captured, strict=True):
            for i, part in enumerate(split_routes(routes, [18, 18])):
                with ref_session.replay(part):
                    (reference(b[2 * i : 2 * i + 2], labels=b[2 * i : 2 * i + 2]).loss / (2 * world)).backward()
    want = _grads(reference)
    for unused in (False, True):
        local = copy.deepcopy(model)
        session = mr.attach(local)
        ddp = DistributedDataParallel(
            local, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=unused
        )
        parts = split_routes(_capture(ddp, session, batches[rank]), [18, 18])
        _perturb(local)
        for i, part in enumerate(parts):
            x = batches[rank][2 * i : 2 * i + 2]
            with ddp.no_sync() if i == 0 else contextlib.nullcontext(), session.replay(part):
                (ddp(x, labels=x).loss / 2).backward()
        _same_grads(_grads(local), want, f"DDP no_sync (find_unused_parameters={unused})")

        def swapped(x: torch.Tensor, routes: mr.Routes, ddp: torch.nn.Module, session: mr.Session) -> None:
            with session.replay(routes), torch.no_grad():
                ddp(x)

        _raises(
            mr.TokenMismatchError,
            "other tokens",
            functools.partial(swapped, batches[rank][:2], parts[1], ddp, session),
        )
        session.detach()


def check_split_from_one_rank(rank: int, world: int, device: torch.device) -> None:
    """Rank 0 captures the whole batch, cuts it unevenly by rank and scatters it: each rank's replay forces its
    part; parts sent in another rank order are refused by their tokens on every rank."""
    torch.manual_seed(0)
    model = mr.models.build("softmax_topk", num_layers=2, expert_impl="dense").to(device)
    everything = torch.cat([_batch(r, device) for r in range(world)])  # rank r's sequences: 2 + r of them
    starts = [sum(2 + q for q in range(r)) for r in range(world + 1)]
    mine = everything[starts[rank] : starts[rank + 1]]
    with mr.attach(model) as session:
        parts = None
        if rank == 0:
            parts = split_routes(_capture(model, session, everything), [(2 + r) * 9 for r in range(world)])
        got = scatter_routes(parts)
        with session.replay(got), session.capture(), torch.no_grad():
            model(mine)
        assert session.routes().equal(got), "a rank's part of one rank's capture was not forced"
        wrong = scatter_routes(parts[::-1] if parts is not None else None)

        def replay(routes: mr.Routes = wrong) -> None:
            with session.replay(routes), torch.no_grad():
                model(mine)

        _raises(mr.TokenMismatchError, "other tokens", replay)


class _ExpertParallelMoE(torch.nn.Module):
    """A router replicated on every rank; each rank holds ``experts / world`` experts and the tokens travel to
    the rank of their expert and back by ``all_to_all`` (expert parallelism, written by hand)."""

    def __init__(self, world: int, hidden: int = 16, experts: int = 4, top_k: int = 2) -> None:
        super().__init__()
        self.router = _LocalRouter(hidden, experts, top_k)
        self.experts = torch.nn.Parameter(0.3 * torch.randn(experts, hidden, hidden))  # only this rank's are used
        self.world, self.top_k, self.per_rank = world, top_k, experts // world

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, chosen = self.router(x)
        token = torch.arange(x.shape[0], device=x.device).repeat_interleave(self.top_k)
        expert = chosen.reshape(-1)
        order = torch.argsort(expert // self.per_rank, stable=True)
        sent = torch.bincount(expert // self.per_rank, minlength=self.world)
        received = torch.empty_like(sent)
        dist.all_to_all_single(received, sent)
        out_split, in_split = received.tolist(), sent.tolist()
        rows = x.new_empty(sum(out_split), x.shape[1])
        experts = expert.new_empty(sum(out_split))
        dist.all_to_all_single(rows, x[token[order]].detach().contiguous(), out_split, in_split)
        dist.all_to_all_single(experts, expert[order].contiguous(), out_split, in_split)
        with torch.no_grad():
            done = torch.einsum("th,thd->td", rows, self.experts[experts])
        back = x.new_empty(len(order), x.shape[1])
        dist.all_to_all_single(back, done, in_split, out_split)
        y = torch.empty_like(back)
        y[order] = back
        return x + (weights[..., None] * y.reshape(x.shape[0], self.top_k, -1)).sum(1)


class _LocalRouter(torch.nn.Module):
    def __init__(self, hidden: int, experts: int, top_k: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(experts, hidden))
        self.top_k, self.num_experts = top_k, experts

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, chosen = torch.topk(torch.softmax(x @ self.weight.t(), dim=-1), self.top_k, dim=-1)
        return weights / weights.sum(-1, keepdim=True), chosen


def check_expert_parallel(rank: int, world: int, device: torch.device) -> None:
    """Expert parallelism by hand: each rank captures its tokens' routes and replays them after the router
    moved; the replayed output and the router's gradient equal a dense computation of the forced experts."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(_ExpertParallelMoE(world), _ExpertParallelMoE(world)).to(device)
    x = torch.randn(5 + 2 * rank, 16, generator=torch.Generator().manual_seed(rank)).to(device)
    with mr.attach(model) as session:
        routes = _capture(model, session, x)
        with torch.no_grad():
            for block in model:
                block.router.weight.add_(2 * torch.randn(block.router.weight.shape).to(device))
        with session.replay(routes), session.capture():
            out = model(x)
            out.sum().backward()
        assert session.routes().equal(routes), "expert parallelism: replay did not force this rank's routes"
    want, weights = x, []
    for block, chosen in zip(model, routes.per_layer(), strict=True):
        w = block.router.weight.detach().clone().requires_grad_(True)
        picked = torch.softmax(want @ w.t(), dim=-1).gather(-1, chosen.long().to(device))
        picked = picked / picked.sum(-1, keepdim=True)
        y = torch.einsum("th,tkhd->tkd", want.detach(), block.experts.detach()[chosen.long().to(device)])
        want = want + (picked[..., None] * y).sum(1)
        weights.append(w)
    want.sum().backward()
    assert torch.allclose(out, want, atol=ATOL), "expert parallelism: replayed output differs"
    for block, w in zip(model, weights, strict=True):
        assert torch.allclose(block.router.weight.grad, w.grad, atol=ATOL), "expert parallelism: router gradient"
    _in_step(rank, device, "expert parallelism")


class _GatedRouter(torch.nn.Module):
    """A router whose scores come from a gate module inside it (torchtitan's ``TokenChoiceTopKRouter``)."""

    def __init__(self, hidden: int = 16, experts: int = 8, top_k: int = 2) -> None:
        super().__init__()
        self.gate = torch.nn.Linear(hidden, experts, bias=False)
        self.top_k, self.num_experts = top_k, experts

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.topk(torch.softmax(self.gate(x), dim=-1), self.top_k, dim=-1)


def check_replicated_gate(rank: int, device: torch.device) -> None:
    """A router whose gate is replicated as a DTensor (torchtitan's ``NoParallel`` on ``router.gate`` under
    tensor parallelism): its forward computes on every rank alone, yet is refused as distributed across ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, distribute_module, distribute_tensor

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))

    def replicate(name: str, module: torch.nn.Module, mesh) -> None:
        module.weight = torch.nn.Parameter(distribute_tensor(module.weight.data, mesh, [Replicate()]))

    def replicated(module: torch.nn.Module, inputs: tuple, mesh) -> tuple:
        return tuple(DTensor.from_local(t, mesh, [Replicate()], run_check=False) for t in inputs)

    def local(module: torch.nn.Module, output: torch.Tensor, mesh) -> torch.Tensor:
        return output.to_local() if isinstance(output, DTensor) else output

    torch.manual_seed(0)
    model = _CountingMoE(_all_reduce).to(device)
    model.router = _GatedRouter().to(device)
    distribute_module(model.router.gate, mesh, replicate, replicated, local)
    x = torch.randn(5, 16, device=device)
    with mr.attach(model) as session:
        routes = _capture(model, session, x)
        with session.replay(routes), session.capture(), torch.no_grad():
            model(x)
        assert session.routes().equal(routes)


def spawned_replicated_gate(rank: int, world: int, init_method: str) -> None:
    """Entry point for torch.multiprocessing.spawn (CPU, gloo): :func:`check_replicated_gate`."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        check_replicated_gate(rank, torch.device("cpu"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    _exit_passed()


def check_fsdp1_units(rank: int, device: torch.device) -> None:
    """Once refused: routes recorded on the bare model (a rollout's) were refused by the model wrapped in FSDP1
    units of each layer, whose wrappers put ``_fsdp_wrapped_module`` inside the routers' paths. They map one to
    one, and the replay forces them."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from moe_replay.models import _Layer

    torch.manual_seed(0)
    model = mr.models.build("softmax_topk", num_layers=3, first_dense_layers=1, expert_impl="dense").to(device)
    x = _batch(rank, device)
    with mr.attach(model) as session:
        routes = _capture(model, session, x)
    _perturb(model)
    policy = ModuleWrapPolicy({_Layer})
    sharded = FullyShardedDataParallel(model, auto_wrap_policy=policy, use_orig_params=True, device_id=device)
    with mr.attach(sharded) as session:
        with session.replay(routes), session.capture():
            sharded(x, labels=x).loss.backward()
        assert session.renamed is not None and all("_fsdp_wrapped_module" in n for n in session.renamed.values())
        assert session.routes().equal(routes.rename(session.renamed)), "FSDP1 units: the routes were not forced"
