"""The token check of a replay whose forwards run compiled whole (``torch.compile(model)``).

Compiled code cannot stop a forward as it begins: the ids it is fed are compared with the rows' token ids on the
device, by the compiled code itself, and a mismatch is refused as the block ends (or at its next eager forward on the
CPU). Each case must be exact (no refusal of the batch the routes were recorded for, no recompile per batch) or
refused with a ``TokenMismatchError``: never silent.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import moe_replay as mr
from moe_replay import _torch_compat

from .test_decisions3 import CompiledHelperTopK, Model, MoE
from .test_feeds import _SequenceFirst, _Unpadding


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class _SharedBlock(torch.nn.Module):
    """Embeddings, then MoE blocks, one of them called at two layers: its router's rows are two calls' per forward,
    the other's one."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(128, 16)
        cfg = mr.models.MoEConfig(hidden_size=16, num_experts=8, top_k=2, expert_size=16)
        self.block, self.other = mr.models.MoEBlock(cfg), mr.models.MoEBlock(cfg)
        g = torch.Generator().manual_seed(0)  # (drawn wider than a block's own draw, from a generator of their own:
        with torch.no_grad():  # routes that do not depend on what the tests before drew from the global one)
            for p in (*self.block.parameters(), *self.other.parameters()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        h = h + self.block(h)
        h = h + self.other(h)
        return h + self.block(h)


def _two_batches(seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 100, (2, 8), generator=g), torch.randint(0, 100, (2, 8), generator=g)


@pytest.mark.reliability("silent replays")
def test_a_model_compiled_whole_refuses_another_batch_and_compiles_once_for_every_batch() -> None:
    """Routes of one batch replayed through ``torch.compile(model, fullgraph=True)`` fed another batch of the same
    shape are refused as the block ends, saying the outputs came from other tokens' experts; the batch they were
    recorded for replays exactly; and no batch, block or refusal compiles anything new."""
    model = mr.models.build("softmax_topk", num_layers=1, expert_impl="dense")
    first, other = _two_batches()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            want = model(first).logits
        routes = session.routes()
        with pytest.raises(mr.TokenMismatchError, match="ran compiled.*discard them"), session.replay(routes):
            compiled(other)
        graphs = counter.frame_count
        with session.replay(routes):
            torch.testing.assert_close(compiled(first).logits, want)
        with pytest.raises(mr.TokenMismatchError, match="16 of its 16 tokens differ"), session.replay(routes):
            compiled(other)
        assert counter.frame_count == graphs


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("emptied", ["fresh_process", "dynamo_rules_cleared"])
def test_a_router_with_a_compiled_helper_leaves_a_later_model_compiled_whole_replaying_exactly(emptied: str) -> None:
    """A router whose top-k runs in a ``torch.compile``d helper, captured until its forwards go lean (the helper
    compiled inside them, with the lean wrappers in torch's namespace), in a process whose torch has not built its
    caches of its namespaces yet (a fresh one: dynamo's rules of torch functions built as moe_replay is imported, or
    those emptied too, as ``torch.distributed``'s process group start does): after ``torch._dynamo.reset()``, another
    model compiled whole still has its router's decision forced, batch after batch (the batch its routes were
    recorded for exactly, another one refused), as in a process that never ran the helper."""
    for module_name, name in _torch_compat._NAMESPACE_CACHES:  # (torch builds each at its first use)
        if name != "get_torch_obj_rule_map" or emptied == "dynamo_rules_cleared":
            getattr(getattr(sys.modules.get(module_name), name, None), "cache_clear", lambda: None)()
    helped = Model(MoE(CompiledHelperTopK()))
    with mr.attach(helped) as session, torch.no_grad(), session.capture():
        for seed in range(3):
            helped(torch.randn(8, 12, generator=torch.Generator().manual_seed(seed)))
    torch._dynamo.reset()
    model = mr.models.build("softmax_topk", num_layers=1, expert_impl="dense")
    first, other = _two_batches()
    compiled = torch.compile(model, backend=CompileCounter(), fullgraph=True)
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            want = model(first).logits
        routes = session.routes()
        for _ in range(2):
            with pytest.raises(mr.TokenMismatchError, match="ran compiled"), session.replay(routes):
                compiled(other)
            with session.replay(routes):
                torch.testing.assert_close(compiled(first).logits, want)


@pytest.mark.reliability("silent replays")
def test_a_later_compiled_forward_fed_other_tokens_is_refused_by_its_rows_and_before_a_later_eager_forward() -> None:
    """The block's second forward is the one fed other tokens (one token changed): refused, naming the rows it read
    and the token, while its first forward, fed its own tokens, alone replays. On the CPU the mark compiled code leaves
    is read at the block's next eager forward, before it runs: the block is refused there, not only as it ends."""
    model = mr.models.build("softmax_topk", num_layers=1, expert_impl="dense")
    first, second = _two_batches(7)
    changed = second.clone()
    changed[1, 3] = (changed[1, 3] + 1) % 100
    compiled = torch.compile(model, backend="eager")
    ran: list[str] = []
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(first)
            model(second)
        routes = session.routes()
        with session.replay(routes):
            compiled(first)
            compiled(second)
        with pytest.raises(mr.TokenMismatchError, match=r"rows 16\.\.31 .* 1 of its 16 tokens differ .*token 11"):
            with session.replay(routes):
                compiled(first)
                compiled(changed)
        with pytest.raises(mr.TokenMismatchError, match="ran compiled"), session.replay(routes):
            compiled(second)
            ran.append("compiled")
            model(second)
            ran.append("eager")
    assert ran == ["compiled"]


@pytest.mark.reliability("silent replays")
def test_a_compiled_model_refuses_tokens_fed_at_rows_recorded_at_prompt_padding() -> None:
    """A capture of a left-padded batch, replayed through a compiled model on the same ids fed without their attention
    mask: the padding's rows would be forced on tokens of the sequences, refused as the eager forward is; with the mask,
    exact. Through AOT autograd's functionalization (what inductor and CUDA graphs get): the mark is an in-place write
    of an input of the graph, and still lands."""
    model = mr.models.build("softmax_topk", num_layers=1, expert_impl="dense")
    ids = torch.randint(1, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = mr.BatchLayout.padded([3, 5], side="left").attention_mask()
    compiled = torch.compile(model, backend="aot_eager")
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(ids, attention_mask=mask)
        routes = session.routes()
        with session.replay(routes):
            compiled(ids, attention_mask=mask)
        with pytest.raises(mr.TokenMismatchError, match="recorded at prompt padding"), session.replay(routes):
            model(ids)  # (eager: refused)
        with pytest.raises(mr.TokenMismatchError, match="ran compiled.*recorded at prompt padding"):
            with session.replay(routes):
                compiled(ids)


@pytest.mark.reliability("silent replays")
def test_a_compiled_model_whose_routers_see_the_batch_sequence_first_replays_and_refuses_in_their_order() -> None:
    """Routers that see the tokens position by position: the capture's batch replays through the compiled model (its
    ids compared in the routers' order, not read row by row), and the same sequences in another order are refused."""
    model = _SequenceFirst().eval()
    ids = torch.randint(3, 128, (3, 4), generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model, backend="eager")
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            want = model(ids)
        routes = session.routes()
        with session.replay(routes):
            torch.testing.assert_close(compiled(ids), want)
        with pytest.raises(mr.TokenMismatchError, match="ran compiled"), session.replay(routes):
            compiled(ids[[1, 0, 2]])


@pytest.mark.reliability("silent replays")
def test_a_compiled_model_whose_routers_see_only_the_unpadded_tokens_replays_its_capture_and_refuses_others() -> None:
    """Routers that see only the tokens the attention mask keeps (fewer rows than ids fed): the capture's padded batch
    replays through the compiled model (compared token by token among those kept), other sequences are refused."""
    model = _Unpadding()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(1, 128, (3, 5), generator=g), torch.randint(1, 128, (3, 5), generator=g)
    compiled = torch.compile(model, backend="eager")
    with mr.attach(model, include="layers.*", top_k=2, num_experts=8) as session, torch.no_grad():
        with session.capture():
            want = model(a, mask)
        routes = session.routes()
        with session.replay(routes):
            torch.testing.assert_close(compiled(a, mask), want)
        with pytest.raises(mr.TokenMismatchError, match="ran compiled"), session.replay(routes):
            compiled(b, mask)


@pytest.mark.reliability("silent replays")
def test_a_compiled_forward_with_gradients_before_any_eager_one_is_checked_or_refused() -> None:
    """The first forward with gradients of a model compiled whole, in a replay block, fed another batch: refused (by
    the token check, or as a forward compiled code cannot establish the decision of), never forced silently."""
    model = mr.models.build("softmax_topk", num_layers=1, expert_impl="dense")
    first, other = _two_batches(3)
    compiled = torch.compile(model, backend="eager")
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(first)
        routes = session.routes()
        with pytest.raises(mr.MoEReplayError), session.replay(routes):
            compiled(other)


@pytest.mark.reliability("silent replays")
def test_a_capture_whose_first_forward_with_gradients_ran_compiled_keeps_its_token_ids() -> None:
    """The first forward with gradients of a model compiled whole, captured before any eager one: dynamo falls back
    frame by frame (the router's refusal inside the trace), and the forward runs eagerly. Its routes keep the ids it
    was fed (once, a function of the check compiled as a frame of its own said the forward was compiled, and the
    routes kept none), so a replay of them on another batch is refused."""
    model = mr.models.build("softmax_topk", num_layers=1, expert_impl="dense")
    first, other = _two_batches(3)
    compiled = torch.compile(model, backend="eager")
    with mr.attach(model) as session:
        with session.capture():
            compiled(first)
        routes = session.routes()
        assert routes.token_ids is not None
        torch.testing.assert_close(routes.token_ids, first.reshape(-1).to(routes.token_ids.dtype))
        with pytest.raises(mr.TokenMismatchError), session.replay(routes), torch.no_grad():
            model(other)


@pytest.mark.reliability("silent replays")
def test_routes_of_a_block_called_at_two_layers_replayed_through_a_compiled_model_on_another_batch_are_refused() -> (
    None
):
    """One MoE block called at two layers (each router's rows its own, two calls per forward), routes of one batch
    replayed through the model compiled whole on another batch: refused, as the eager forward is, naming the router
    whose rows were another forward's; the capture's forwards in their order replay exactly, and no batch or block
    compiles anything new."""
    model = _SharedBlock()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(1, 128, (3, 5), generator=g), torch.randint(1, 128, (3, 5), generator=g)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(a)
            model(b)
        routes = session.routes()
        assert routes._router_ids is not None
        with pytest.raises(mr.TokenMismatchError), session.replay(routes):
            model(b)  # (eager: refused)
        with pytest.raises(mr.TokenMismatchError, match="ran compiled"), session.replay(routes):
            compiled(b)
        moved = torch.Generator().manual_seed(1)  # (a fixed draw: the check below does not hang on the tests before)
        for p in model.parameters():  # (the routers choose other experts now: the replay forces the recorded ones)
            p.add_(torch.randn(p.shape, generator=moved))
        with session.capture():
            model(a)
            model(b)
        assert not session.routes().equal(routes)
        with session.replay(routes), session.capture():
            compiled(a)
            compiled(b)
        assert session.routes().equal(routes)
        graphs = counter.frame_count
        with pytest.raises(mr.TokenMismatchError, match=r"rows 30\.\.44 of the routes of router 'block\.router'"):
            with session.replay(routes):
                compiled(a)
                compiled(a)
        assert counter.frame_count == graphs
