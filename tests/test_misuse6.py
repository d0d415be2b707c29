"""Misuse of the public API by a user who holds several models in one module, edits routes by hand, and
joins what other tests keep apart.

Each case must end in a ``MoEReplayError`` that leaves the model as it was, or in a replay that forces exactly
the recorded experts with the output of a replay written by hand: never rows forced on other tokens unchecked.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moe_replay as mr

from .conftest import assert_untouched, snapshot, tried
from .test_misuse import _forced, _forced_by_hand, _ids, _model


# ----------------------------------------------------------------------------- several models in one holder
class _Holder(nn.Module):
    """A policy and a reference model held together, each called on its own: the holder has no forward."""

    def __init__(self, policy: nn.Module, ref: nn.Module) -> None:
        super().__init__()
        self.policy = policy
        self.ref = ref


def _holders() -> dict[str, tuple[nn.Module, mr.models.MoETransformer, mr.models.MoETransformer]]:
    def built() -> tuple[mr.models.MoETransformer, mr.models.MoETransformer]:
        return _model(), mr.models.build("softmax_topk", num_layers=2, seed=1)

    out = {}
    a, b = built()
    out["plain holder"] = (_Holder(a, b), a, b)
    a, b = built()
    out["ModuleDict"] = (nn.ModuleDict({"policy": a, "ref": b}), a, b)
    a, b = built()
    out["ModuleList"] = (nn.ModuleList([a, b]), a, b)
    return out


def _part(routes: mr.Routes, prefix: str) -> mr.Routes:
    """The routes of one model of a holder, under that model's own router names."""
    mine = routes.select([n for n in routes.names if n.startswith(prefix)])
    return mine.rename({prefix: ""})


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("holder", ["plain holder", "ModuleDict", "ModuleList"])
def test_models_held_together_and_called_each_on_its_own_keep_their_tokens(holder: str) -> None:
    """A session attached to a module that only holds two models (a policy and a reference), each called on its
    own: no forward enters the holder, so its capture knew none of the tokens its models were fed, and a replay of
    the batches swapped between the forwards forced one batch's experts on the other, unchecked. Each model's
    forwards are seen now: that replay is refused before any router reads a row, leaving the models as they were,
    and a replay of the models in another order than captured (each router reads its own rows) is exact."""
    both, a, b = _holders()[holder]
    prefixes = [n + "." for n, _ in both.named_children()]
    x1, x2 = _ids(1), _ids(2)
    pristine = snapshot(both)
    session = mr.attach(both)
    with session.capture():
        a(x1)
        b(x1)
        a(x2)
        b(x2)
    routes = session.routes()

    before = snapshot(both)
    with pytest.raises(mr.TokenMismatchError, match="other tokens"):
        with torch.no_grad(), session.replay(routes):
            a(x2)  # (the rows of x1 first)
    tried()
    after = snapshot(both)
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())

    # each model on its own batches, the models in another order: each router's own rows, checked, not refused
    with torch.no_grad(), session.replay(routes):
        b(x1), b(x2), a(x1), a(x2)
    # and forced exactly
    forced = _forced(routes)  # (experts no native forward chooses)
    with torch.no_grad(), session.replay(forced):
        out_b = [b(x1).logits, b(x2).logits]
        out_a = [a(x1).logits, a(x2).logits]
    n = x1.numel()
    for model, outs, prefix in ((a, out_a, prefixes[0]), (b, out_b, prefixes[1])):
        mine = _part(forced, prefix)
        assert torch.equal(outs[0], _forced_by_hand(model, x1, mine[:n]))
        assert torch.equal(outs[1], _forced_by_hand(model, x2, mine[n:]))
    tried()
    session.detach()
    assert_untouched(both, pristine)  # (the held models' forwards given back too)


class _Policy(nn.Module):
    """A policy whose forward runs its language model, with a reference model beside it that the user calls
    directly."""

    def __init__(self, lm: nn.Module, ref: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        self.ref = ref

    def forward(self, x: torch.Tensor) -> object:
        return self.lm(x)


@pytest.mark.reliability("silent replays")
def test_a_model_called_beside_the_attached_models_forward_gets_no_token_ids_of_that_forward() -> None:
    """A session on a policy whose forward runs its language model, beside a reference model called on its own:
    every router made as many calls of as many rows, so the ids of the language model's forwards were given to the
    reference's rows too, recorded in other forwards on other tokens. Its rows replayed on a session of the
    reference alone, on the batches the ids name, then forced the experts of one batch on the other unchecked. Now
    the reference's forwards are seen at a level of their own (its rows keep the ids of its own forwards), the
    language model's keep theirs, and a replay in the captured order forces both exactly."""
    lm, ref = _model(), mr.models.build("softmax_topk", num_layers=2, seed=1)
    policy = _Policy(lm, ref)
    x1, x2 = _ids(1), _ids(2)
    session = mr.attach(policy)
    with session.capture():
        policy(x1)
        ref(x2)
        policy(x2)
        ref(x1)
    routes = session.routes()

    # the language model's rows keep their forwards' ids: the batches swapped are refused
    with pytest.raises(mr.TokenMismatchError, match="other tokens"):
        with torch.no_grad(), session.replay(routes):
            policy(x2)
    tried()
    # in the captured order, both forced exactly
    forced = _forced(routes)
    with torch.no_grad(), session.replay(forced):
        outs = [policy(x1).logits, ref(x2).logits, policy(x2).logits, ref(x1).logits]
    n = x1.numel()
    mine, theirs = _part(forced, "lm."), _part(forced, "ref.")
    assert torch.equal(outs[0], _forced_by_hand(lm, x1, mine[:n]))
    assert torch.equal(outs[2], _forced_by_hand(lm, x2, mine[n:]))
    assert torch.equal(outs[1], _forced_by_hand(ref, x2, theirs[:n]))
    assert torch.equal(outs[3], _forced_by_hand(ref, x1, theirs[n:]))
    tried()
    session.detach()

    # the reference's rows on a session of its own: they name no batch of its forwards, so they are not forced on
    # the batches the language model was fed in that order (x1, then x2: the reference was fed x2, then x1)
    own = mr.attach(ref)
    before = snapshot(ref)
    with pytest.raises(mr.TokenMismatchError):
        with torch.no_grad(), own.replay(_part(routes, "ref.")):
            ref(x1)
            ref(x2)
    tried()
    after = snapshot(ref)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    own.detach()


@pytest.mark.reliability("silent replays")
def test_compare_refuses_routes_of_other_tokens_that_know_each_routers_own_ids() -> None:
    """Captures where a router was also called on hidden states of one's own (an auxiliary loss) know each
    router's own token ids, not one id per row: compare() checked the ids of routes of one id per row only, and
    compared the decisions of other tokens as if they were the same tokens' (any rate of difference, no word). Now
    each router's own ids are checked too: captures of other batches are refused, of the same batch compared."""
    model = _model()
    session = mr.attach(model)
    hidden = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    router = model.layers[0].mlp.router

    def captured(x: torch.Tensor) -> mr.Routes:
        with torch.no_grad(), session.capture():
            model(x)
            router(hidden)  # (on hidden states of one's own: its rows are no token of a forward)
        return session.routes()

    first, again, other = captured(_ids(1)), captured(_ids(1)), captured(_ids(2))
    assert first.token_ids is None  # (one id per row fits no router here: each router's own)
    for name in first.names:
        assert mr.compare(first, again, names=[name]).overall == 0.0
        with pytest.raises(mr.RoutesValidationError, match="recorded for other tokens"):
            mr.compare(first, other, names=[name])
        tried(2)
        dropped = mr.compare(first.with_token_ids(None), other.with_token_ids(None), names=[name])
        assert dropped.compared.sum() == first.layer(name).shape[0]
    session.detach()


@pytest.mark.reliability("wrappers")
def test_scores_kept_on_models_held_together_get_their_own_forwards_mask() -> None:
    """keep_scores() on a holder of two models, each called on its own: no forward of the holder was seen, so a
    mask of the forwards' tokens was refused for every router (a false refusal). Each model's forwards are seen now:
    each router's rows get the mask of the forward that called it, whether the masks come as a list or stacked."""
    a, b = _model(), mr.models.build("softmax_topk", num_layers=2, seed=1)
    session = mr.attach(nn.ModuleDict({"a": a, "b": b}))
    masks = [torch.ones(2, 6), torch.ones(2, 6)]
    masks[0][0, :3] = 0  # (left padding in a's batch, right padding in b's: each router's own must show)
    masks[1][1, 4:] = 0
    with torch.no_grad(), session.keep_scores() as kept:
        a(_ids(1))
        b(_ids(2))
    for given in (masks, torch.cat(masks)):
        for name, weights in zip(kept.names, kept.row_mask(given), strict=True):
            assert torch.equal(weights, masks[0 if name.startswith("a.") else 1].reshape(-1)), name
        tried()
    session.detach()


@pytest.mark.reliability("silent replays")
def test_a_model_called_beside_the_attached_models_forward_is_refused_on_swapped_batches() -> None:
    """The reference beside a policy's forward, captured on x2 then x1 and replayed on x1 then x2 (the policy in
    order): its rows would force x2's experts on x1. Expected: refused, as the policy's own swapped batches are."""
    lm, ref = _model(), mr.models.build("softmax_topk", num_layers=2, seed=1)
    policy = _Policy(lm, ref)
    x1, x2 = _ids(1), _ids(2)
    session = mr.attach(policy)
    with session.capture():
        policy(x1)
        ref(x2)
        policy(x2)
        ref(x1)
    routes = session.routes()
    with pytest.raises(mr.TokenMismatchError):
        with torch.no_grad(), session.replay(routes):
            policy(x1)
            ref(x1)
            policy(x2)
            ref(x2)
    tried()


class _EncoderDecoder(nn.Module):
    """Two models whose forward runs one, then the other (an encoder, then its decoder), the first also called on its
    own (as ``generate()`` calls an encoder apart); ``tie``: the second uses the first's embedding, or its weight."""

    def __init__(self, tie: str) -> None:
        super().__init__()
        self.encoder = _model()
        self.decoder = mr.models.build("softmax_topk", num_layers=2, seed=1)
        if tie == "embedding":
            self.decoder.embed = self.encoder.embed
        elif tie == "weight":
            self.decoder.embed.weight = self.encoder.embed.weight

    def forward(self, x: torch.Tensor) -> object:
        self.encoder(x)
        return self.decoder(x)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("tie", ["none", "embedding", "weight"])
def test_a_part_called_on_its_own_beside_the_forward_that_runs_it_is_checked(tie: str) -> None:
    """A part of the attached module that its forward runs, called on its own too (an encoder that generate() calls
    apart), whether or not it shares its embedding with the other part: its own forwards are seen, so its batches
    swapped between capture and replay are refused before a router reads a row, the model left as it was, and a
    replay in the captured order forces its rows exactly."""
    model = _EncoderDecoder(tie)
    x1, x2 = _ids(1), _ids(2)
    session = mr.attach(model)
    with session.capture():
        model(x1)
        model.encoder(x2)
    routes = session.routes()
    before = snapshot(model)
    with pytest.raises(mr.TokenMismatchError, match="other tokens"):
        with torch.no_grad(), session.replay(routes):
            model(x1)
            model.encoder(x1)  # (the rows of x2)
    tried()
    after = snapshot(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    forced = _forced(routes)
    with torch.no_grad(), session.replay(forced):
        model(x1)
        out = model.encoder(x2).logits
    n = x1.numel()
    assert torch.equal(out, _forced_by_hand(model.encoder, x2, _part(forced, "encoder.")[n:]))
    session.detach()


# ----------------------------------------------------------------------------- turns of several conversations at once
@pytest.mark.reliability("silent replays")
def test_turns_that_each_join_two_conversations_are_refused_by_stitch_turns() -> None:
    """Two conversations' turns, each turn the Routes.cat of both conversations' routes (the batch of an engine
    call), stitched as one conversation: expected refused, never rows of one conversation laid over the other's."""
    names = ["model.layers.0.mlp.gate"]

    def turn(*seqs: list[list[int]]) -> mr.Routes:
        return mr.Routes.cat([mr.Routes([torch.tensor(s)], names=names, num_experts=8) for s in seqs])

    # conversation A: 3 then 5 tokens, the second turn returned from token 2 on; B likewise
    first = turn([[0, 1], [2, 3], [-1, -1]], [[4, 5], [6, 7], [-1, -1]])
    second = turn([[-1, -1], [-1, -1], [1, 2], [3, 4], [-1, -1]], [[-1, -1], [-1, -1], [5, 6], [7, 0], [-1, -1]])
    with pytest.raises(mr.RoutesValidationError):
        mr.interop.stitch_turns([first, second], overlap="first", gaps="native")
    tried()


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("ids", ["given", "known to the routes"])
def test_turns_joined_from_pieces_of_one_sequence_stitch_where_token_ids_check_them(ids: str) -> None:
    """No false refusal: one conversation whose turns are each joined from the routes of its prompt and of its
    completion (Routes.cat of pieces of one sequence) stitches as its unjoined turns do where token ids check the
    turns as one sequence (given, or known for every row); without them it is refused, as a batch's turns are."""
    names = ["model.layers.0.mlp.gate"]
    rows = [[0, 1], [2, 3], [4, 5], [6, 7], [1, 2], [3, 4], [-1, -1]]
    tokens = [11, 12, 13, 14, 15, 16, 17]
    lengths = [3, 7]  # (each turn's whole sequence: the second repeats the first)
    starts = [0, 2]  # (each turn returned from there on, -1 rows before)

    def turn(i: int, cut: int) -> mr.Routes:
        n = lengths[i]
        mine = [[-1, -1]] * starts[i] + rows[starts[i] : n - 1] + [[-1, -1]]
        pieces = [(0, cut), (cut, n)] if cut else [(0, n)]  # (each piece built on its own, as an engine returns them)
        made = [mr.Routes([torch.tensor(mine[a:b])], names=names, num_experts=8) for a, b in pieces]
        if ids == "known to the routes":
            made = [r.with_token_ids(tokens[a:b]) for r, (a, b) in zip(made, pieces, strict=True)]
        return mr.Routes.cat(made)

    plain = [turn(0, 0), turn(1, 0)]
    joined = [turn(0, 2), turn(1, 3)]
    given = [tokens[:n] for n in lengths] if ids == "given" else None
    want = mr.interop.stitch_turns(plain, token_ids=given, overlap="first", gaps="native")
    got = mr.interop.stitch_turns(joined, token_ids=given, overlap="first", gaps="native")
    assert got.equal(want) and torch.equal(got.token_ids, want.token_ids)
    if ids == "given":
        with pytest.raises(mr.RoutesValidationError, match="joined"):
            mr.interop.stitch_turns(joined, overlap="first", gaps="native")
        tried()


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("holder", ["plain holder", "ModuleDict", "ModuleList"])
def test_verify_on_a_holder_of_models_names_what_to_run_instead(holder: str) -> None:
    """``session.verify(x)`` runs the attached module's forward, which a holder of models does not have: torch's
    own ``NotImplementedError`` came out. A ``MoEReplayError`` now names the held models to run instead, and the
    models are left as they were (one eager forward of a held model then establishes its routers)."""
    both, _, _ = _holders()[holder]
    before = snapshot(both)
    with mr.attach(both) as session:
        with pytest.raises(mr.MoEReplayError, match="no forward of its own") as err:
            session.verify(_ids(1))
        first = next(n for n, _ in both.named_children())
        assert repr(first) in str(err.value)
        with torch.no_grad():
            for model in both.children():
                model(_ids(1))  # (what the message says to do instead)
        with session.capture(), torch.no_grad():
            for model in both.children():
                model(_ids(1))
        assert session.routes().num_tokens > 0
    assert_untouched(both, before)
    tried(2)


@pytest.mark.reliability("silent replays")
def test_hf_encoder_decoder_generate_calls_replayed_on_swapped_batches_are_refused() -> None:
    """Once silent: generate() of a transformers encoder-decoder calls its encoder on its own, outside every forward
    of the model, and its stack shares the model's config (is_encoder_decoder), so even seen at a level of its own its
    forward was read as one of two token streams and kept no ids: two generate() calls replayed with their batches
    swapped forced one batch's encoder experts on the other. The encoder's stack, below the model's level and fed no
    decoder_input_ids, keeps its ids now: that replay is refused, and the captured order replays as generated."""
    transformers = pytest.importorskip("transformers")
    config = transformers.SwitchTransformersConfig(
        vocab_size=128, d_model=32, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=4,
        num_experts=4, encoder_sparse_step=1, decoder_sparse_step=1, pad_token_id=0, decoder_start_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.SwitchTransformersForConditionalGeneration(config).eval()
    x1, x2 = (torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(i)) for i in (1, 2))
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            want = [model.generate(x, max_new_tokens=3, do_sample=False) for x in (x1, x2)]
        routes = session.routes()
        with pytest.raises(mr.TokenMismatchError, match="other tokens"):
            with session.replay(routes), torch.no_grad():
                model.generate(x2, max_new_tokens=3, do_sample=False)
        tried()
        with session.replay(routes), torch.no_grad():
            got = [model.generate(x, max_new_tokens=3, do_sample=False) for x in (x1, x2)]
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
