"""Misuse of the interop, batch-layout and file paths the suite did not hold yet: an engine writer given routes of
other routers (a pipeline stage's, another model's) said only which routers were missing, not what the routes held
or what to do; ``from_megatron`` given a stage's list named only the two counts; ``to_verl`` given a response_width
too narrow named a ``row_length`` the caller never passed; a sequence shorter than its prompt was not said by how
much; ``BatchLayout.unpack`` of routes of another batch said no more than the counts; ``Routes.load`` of a name whose
``.npz`` suffix was added or taken off said "no such file" beside the file; ``to_numpy(torch.int32)`` did not name
the numpy dtype to pass. Each is now said with what to do, and doing it works, every row kept."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch

import moe_replay as mr
from moe_replay.errors import MoEReplayError

NAMES = ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]


def _rows(n: int, shift: int = 0, experts: int = 4) -> torch.Tensor:
    """``n`` rows of two distinct experts each, varying by token."""
    t = torch.arange(n) + shift
    return torch.stack([t % experts, (t + 1) % experts], dim=1)


def _routes(n: int, names: list[str] = NAMES, experts: int = 4) -> mr.Routes:
    return mr.Routes([_rows(n, i, experts) for i in range(len(names))], names=names, num_experts=experts)


@pytest.mark.reliability("clear errors")
@pytest.mark.parametrize(
    "writer, layout", [("to_vllm", "all"), ("to_vllm_legacy", "all"), ("to_megatron_inference", "moe")]
)
def test_an_engine_writer_given_a_stages_routes_names_what_they_hold_and_the_map_that_fits(
    writer: str, layout: str
) -> None:
    """Routes of one router of two (a pipeline stage's capture) were refused naming only the missing router: the
    message now names the routers the routes hold and the map to build; that map writes every row they hold."""
    lm = mr.LayerMap.from_names(NAMES, num_layers=2, num_experts=4, top_k=2)
    stage = _routes(4).select(NAMES[1:])
    write = getattr(mr.interop, writer)
    with pytest.raises(MoEReplayError) as refused:
        write(stage, lm, drop_last=True)
    said = str(refused.value)
    assert NAMES[0] in said and f"they hold {[NAMES[1]]}" in said, said
    assert "LayerMap.from_routes" in said and "pipeline stage" in said, said
    own = mr.LayerMap.from_routes(stage, num_layers=2)
    arr = np.asarray(write(stage, own, drop_last=True))
    assert arr.shape[0] == stage.num_tokens - 1  # (the last row is the one engines never write)
    assert np.array_equal(arr[:, own.column(NAMES[1], layout)], stage.layer(NAMES[1])[:-1].numpy())


@pytest.mark.reliability("clear errors")
def test_an_engine_writer_given_routes_of_another_expert_count_says_to_build_the_map_of_their_model() -> None:
    lm = mr.LayerMap.from_names(NAMES, num_layers=2, num_experts=4, top_k=2)
    other = _routes(3, experts=8)
    with pytest.raises(MoEReplayError) as refused:
        mr.interop.to_vllm(other, lm, drop_last=True)
    said = str(refused.value)
    assert "8 experts" in said and "the LayerMap 4" in said and "LayerMap.from_routes" in said, said
    arr = mr.interop.to_vllm(other, mr.LayerMap.from_routes(other, num_layers=2), drop_last=True)
    assert arr.shape == (other.num_tokens - 1, 2, 2)


@pytest.mark.reliability("clear errors")
def test_from_megatron_given_a_pipeline_stages_list_says_to_name_that_stages_routers() -> None:
    """A stage's list holds only its own layers: the names of every router were refused by their counts alone."""
    stage_list = [_rows(6, 1)]
    with pytest.raises(MoEReplayError) as refused:
        mr.interop.from_megatron(stage_list, NAMES, 4)
    said = str(refused.value)
    assert "1 Megatron layers for 2 router names" in said and "pipeline stage" in said, said
    with pytest.raises(MoEReplayError) as more:  # (more tensors than names: no stage, so no stage hint)
        mr.interop.from_megatron(stage_list * 3, NAMES, 4)
    assert "pipeline stage" not in str(more.value) and "one name per tensor" in str(more.value)
    routes = mr.interop.from_megatron(stage_list, NAMES[1:], 4)
    assert routes.names == (NAMES[1],) and torch.equal(routes.layer(NAMES[1]), stage_list[0])


@pytest.mark.reliability("clear errors")
def test_to_verl_with_a_response_width_too_narrow_names_it_and_the_width_that_fits() -> None:
    """It said ``row_length=4 is too short``: a parameter to_verl does not take. Now the response_width given, the
    sequence whose response does not fit and the width that does; with that width every row is written."""
    lm = mr.LayerMap.from_names(NAMES, num_layers=2, num_experts=4, top_k=2)
    seqs = [_routes(3), _routes(5)]
    prompts = [2, 2]
    with pytest.raises(MoEReplayError) as refused:
        mr.interop.to_verl(seqs, lm, prompt_lengths=prompts, response_width=2)
    said = str(refused.value)
    assert "response_width=2" in said and "sequence 1" in said and "response_width=3" in said, said
    assert "row_length" not in said, said
    batch = mr.interop.to_verl(seqs, lm, prompt_lengths=prompts, response_width=3)
    assert batch.shape[1] == 2 + 3
    back = mr.interop.from_verl(batch, (batch[..., 0, 0] != 0) | (batch[..., 0, 1] != 0), lm, last_routed=True)
    assert [r.num_tokens for r in back] == [s.num_tokens for s in seqs]


@pytest.mark.reliability("clear errors")
def test_a_sequence_shorter_than_its_prompt_is_said_with_both_lengths() -> None:
    with pytest.raises(MoEReplayError) as refused:
        mr.BatchLayout.split(prompt_lengths=[2, 4], lengths=[5, 3])
    said = str(refused.value)
    assert "sequence 1" in said and "3 tokens" in said and "prompt_lengths[1]=4" in said, said
    assert "prompt plus completion" in said, said
    layout = mr.BatchLayout.split(prompt_lengths=[2, 4], lengths=[5, 7])
    assert layout.lengths == (5, 7)


@pytest.mark.reliability("clear errors")
def test_unpack_of_routes_of_another_batch_says_what_it_takes() -> None:
    layout = mr.BatchLayout.padded([3, 2])
    with pytest.raises(MoEReplayError) as refused:
        layout.unpack(_routes(5))
    said = str(refused.value)
    assert "5 rows" in said and "[2, 3] batch has 6" in said and "whole batch" in said, said
    parts = layout.unpack(layout.routes([_routes(3), _routes(2)]))
    assert [p.num_tokens for p in parts] == [3, 2]


@pytest.mark.reliability("clear errors")
@pytest.mark.parametrize("saved, asked", [("routes", "routes.npz"), ("routes.npz", "routes")])
def test_load_of_a_name_whose_npz_suffix_differs_from_the_file_names_the_file(
    tmp_path: pathlib.Path, saved: str, asked: str
) -> None:
    """save() writes the name it is given, with no suffix added (np.savez adds one): a load of the other spelling
    said "no such file" beside the file. Now it names it; loaded, it holds every row."""
    routes = _routes(4)
    routes.save(tmp_path / saved)
    with pytest.raises(mr.MissingFileError) as refused:
        mr.Routes.load(tmp_path / asked)
    said = str(refused.value)
    assert repr(str(tmp_path / saved)) in said and "no suffix" in said, said
    back = mr.Routes.load(tmp_path / saved)
    assert back.num_tokens == routes.num_tokens and np.array_equal(back.to_numpy(), routes.to_numpy())
    (tmp_path / saved).unlink()  # (and with no such file either way, no file is named)
    with pytest.raises(mr.MissingFileError) as neither:
        mr.Routes.load(tmp_path / asked)
    assert "no suffix" not in str(neither.value)


@pytest.mark.reliability("clear errors")
def test_to_numpy_given_a_torch_dtype_names_the_numpy_dtype_to_pass() -> None:
    routes = _routes(3)
    with pytest.raises(MoEReplayError) as refused:
        routes.to_numpy(torch.int32)
    assert "pass np.int32" in str(refused.value), str(refused.value)
    arr = routes.to_numpy(np.int32)
    assert arr.dtype == np.int32 and arr.shape == (3, 2, 2)


@pytest.mark.reliability("clear errors")
def test_from_vllm_split_given_completion_len_0_says_a_completion_holds_a_token() -> None:
    """It said vLLM 0.21 "gives -1" rows: the count of a completion of no token, which vLLM never returns."""
    lm = mr.LayerMap.from_names(NAMES, num_layers=2, num_experts=4, top_k=2)
    prompt = np.stack([_rows(3).numpy(), _rows(3, 1).numpy()], axis=1).astype(np.int16)
    with pytest.raises(MoEReplayError) as refused:
        mr.interop.from_vllm_split(prompt, prompt[:0], lm, completion_len=0, prompt_len=3)
    said = str(refused.value)
    assert "completion_len=0" in said and "-1" not in said and "len(CompletionOutput.token_ids)" in said, said
    routes = mr.interop.from_vllm_split(prompt, prompt[:0], lm, completion_len=1, prompt_len=3)
    assert routes.num_tokens == 3 + 1 and torch.equal(routes.layer(NAMES[0])[:3], torch.from_numpy(prompt[:, 0]).long())


@pytest.mark.reliability("clear errors")
@pytest.mark.parametrize("bad", [3.0, 5.4])
def test_stitch_turns_given_token_ids_that_are_no_integers_names_the_turns_ids(bad: float) -> None:
    """An id 3.0 passed the prefix check as 3 and was refused in ``with_token_ids()``'s words, a call not made; 5.4
    was called a re-tokenised history. Both are now refused as the ids of the turn they are."""
    first, second = _routes(3), _routes(5)
    with pytest.raises(MoEReplayError) as refused:
        mr.interop.stitch_turns([first, second], token_ids=[[1, 2, bad], [1, 2, 3, 4, 5]])
    said = str(refused.value)
    assert "stitch_turns: token_ids[0]" in said and "integers" in said and "with_token_ids" not in said, said
    whole = mr.interop.stitch_turns([first, second], token_ids=[[1, 2, 3], [1, 2, 3, 4, 5]])
    assert whole.num_tokens == 5 and whole.token_ids.tolist() == [1, 2, 3, 4, 5]


@pytest.mark.reliability("clear errors")
def test_rollout_routes_of_part_of_the_generate_batch_asks_whether_the_ids_are_of_that_call() -> None:
    """The prompts and completions of one sequence of a batch of two: the row count differs, and the message asked
    only about a KV cache or a second call. It now asks first whether the ids are every sequence of that call."""
    pytest.importorskip("trl")
    from moe_replay.integrations import trl as mr_trl

    from .integrations.test_trl import PAD, policy

    model = policy().eval()
    prompts = [[5, 6, 7], [8, 9]]
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            out = model.generate(
                torch.tensor([[5, 6, 7], [PAD, 8, 9]]),
                attention_mask=torch.tensor([[1, 1, 1], [0, 1, 1]]),
                max_new_tokens=2,
                do_sample=False,
                pad_token_id=PAD,
            )
        routes = session.routes()
    completions = [row[3:].tolist() for row in out]
    with pytest.raises(MoEReplayError) as refused:
        mr_trl.rollout_routes_from_generate(routes, prompts[:1], completions[:1])
    said = str(refused.value)
    assert "every sequence it ran" in said and "KV cache" in said, said
    seqs = mr_trl.rollout_routes_from_generate(routes, prompts, completions)
    assert [s.num_tokens for s in seqs] == [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]


@pytest.mark.reliability("clear errors")
def test_engine_readers_given_ids_that_are_no_integers_name_their_own_argument() -> None:
    """``from_sglang(token_ids=[1.0, ...])`` and a NeMo-RL message of float ids were refused in the words of
    ``with_token_ids()``, a call the user did not make; each now names the argument the ids came in."""
    lm = mr.LayerMap.from_names(NAMES, num_layers=2, num_experts=4, top_k=2)
    routes = _routes(5)
    payload = mr.interop.to_sglang(routes, lm, drop_last=True)
    with pytest.raises(MoEReplayError) as refused:
        mr.interop.from_sglang(payload, lm, token_ids=[1.0, 2, 3, 4, 5])
    said = str(refused.value)
    assert "from_sglang: token_ids" in said and "with_token_ids" not in said, said
    got = mr.interop.from_sglang(payload, lm, token_ids=[1, 2, 3, 4, 5])
    assert got.num_tokens == 5 and got.token_ids.tolist() == [1, 2, 3, 4, 5]
    message = {
        "routed_experts": mr.interop.to_nemo_rl(routes, lm, drop_last=True),
        "prompt_token_ids": [1.0, 2.0],
        "generation_token_ids": [3, 4, 5],
    }
    with pytest.raises(MoEReplayError) as nemo:
        mr.interop.from_nemo_rl(message, lm)
    said = str(nemo.value)
    assert "prompt_token_ids + generation_token_ids" in said and "with_token_ids" not in said, said
    message["prompt_token_ids"] = [1, 2]
    assert mr.interop.from_nemo_rl(message, lm).token_ids.tolist() == [1, 2, 3, 4, 5]
    with pytest.raises(MoEReplayError, match=r"^with_token_ids\(\)"):  # (the method's own call keeps its name)
        routes.with_token_ids([1.0, 2, 3, 4, 5])


@pytest.mark.reliability("clear errors")
@pytest.mark.parametrize("batch_size, said", [(0, "at least one sequence"), (4, "counts that divide 6")])
def test_from_megatron_given_a_batch_size_that_fits_no_batch_says_what_would(batch_size: int, said: str) -> None:
    tensors = [_rows(6), _rows(6, 1)]
    with pytest.raises(MoEReplayError) as refused:
        mr.interop.from_megatron(tensors, NAMES, 4, batch_size=batch_size)
    assert said in str(refused.value) and f"batch_size={batch_size}" in str(refused.value), str(refused.value)
    routes = mr.interop.from_megatron(tensors, NAMES, 4, batch_size=2)  # ([S=3, B=2] rows, read batch-major)
    assert routes.num_tokens == 6 and torch.equal(routes.layer(NAMES[0]), tensors[0][[0, 2, 4, 1, 3, 5]])


@pytest.mark.reliability("clear errors")
@pytest.mark.parametrize("rows", [slice(0, 5), slice(1, 10)])
def test_split_generation_of_a_slice_that_cuts_the_prompt_forward_says_so(rows: slice) -> None:
    """A slice holding part of the prompt forward, as many rows as the prompt tokens the mask keeps, was refused as
    the capture of a model that takes padding out: it is now said as the slice it is, with the slice that holds the
    prompt forward whole."""
    from moe_replay.models import build

    model = build("softmax_topk")
    with mr.attach(model) as session:
        with session.capture():
            model(torch.randint(0, 50, (2, 3)))  # (a prompt forward of 2 prompts of 3, then two decode steps)
            model(torch.randint(0, 50, (2, 1)))
            model(torch.randint(0, 50, (2, 1)))
        routes = session.routes()
    with pytest.raises(MoEReplayError) as refused:
        mr.split_generation(routes[rows], batch_size=2, prompt_len=3, prompt_lengths=[3, 2])
    said = str(refused.value)
    assert f"rows {rows.start}..{rows.stop - 1}" in said and "cuts that forward" in said, said
    assert "routes[:6]" in said, said
    parts = mr.split_generation(routes[:8], batch_size=2, prompt_len=3)  # (the prompt forward and one step, whole)
    assert [p.num_tokens for p in parts] == [3 + 2, 3 + 2]


@pytest.mark.reliability("clear errors")
def test_scatter_routes_given_parts_of_another_world_size_names_what_it_was_given(tmp_path: pathlib.Path) -> None:
    """Two parts (gathered under a world of two) scattered to a world of one said only that one part per rank is
    needed: now what the source was given, and how to cut the parts again; cut so, every row comes back."""
    import torch.distributed as dist

    routes = _routes(5)
    parts = mr.distributed.split_routes(routes, [2, 3])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        said = []
        for given, words in ((parts, "got 2 parts"), (routes, "got one Routes"), (None, "got None")):
            with pytest.raises(MoEReplayError) as refused:
                mr.distributed.scatter_routes(given)  # type: ignore[arg-type]
            said.append(str(refused.value))
            assert words in said[-1] and "split_routes" in said[-1] and "Routes.cat" in said[-1], said[-1]
        back = mr.distributed.scatter_routes(mr.distributed.split_routes(mr.Routes.cat(parts), [5]))
    finally:
        dist.destroy_process_group()
    assert back.num_tokens == routes.num_tokens and np.array_equal(back.to_numpy(), routes.to_numpy())
