"""The benchmark harness in smoke mode: it runs end to end and its checks hold (timings are not checked)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

import moe_replay as mr
from benchmarks import report, unchecked
from benchmarks.harness import check_workload, eager_variants, time_variants
from benchmarks.run import main
from benchmarks.workloads import make_workload, transformers_version


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    md = out.with_suffix(".md")
    text = io.StringIO()
    with contextlib.redirect_stdout(text), contextlib.redirect_stderr(io.StringIO()):
        assert main(["--smoke", "--device", "cpu", "--out", str(out), "--md", str(md)]) == 0
    assert md.read_text() == text.getvalue()
    return json.loads(Path(out).read_text()), text.getvalue()


def test_every_workload_and_variant_is_timed(smoke: tuple[dict, str]) -> None:
    results, _ = smoke
    want = {("reference", "prefill"), ("reference", "decode")}
    if transformers_version() is not None:
        want |= {("qwen3", "prefill"), ("qwen3", "decode")}
    assert {(w["model"], w["shape"]) for w in results["workloads"]} == want
    assert all("error" not in w for w in results["steps"])
    for w in results["workloads"]:
        assert "error" not in w
        v = w["variants"]
        assert {"plain", "idle", "capture", "replay", "recipe_capture", "recipe_replay", "naive_capture"} <= set(v)
        assert all(len(x["times_ms"]) == w["reps"] and x["median_ms"] > 0 for x in v.values())
        assert v["plain"]["ratio"] == 1.0


def test_all_approaches_record_the_same_experts_and_replay_is_exact(smoke: tuple[dict, str]) -> None:
    for w in smoke[0]["workloads"]:
        c = w["checks"]
        assert c["recipe_indices_equal"] and c["naive_indices_equal"], w["model"]
        assert c["captured_rows_are_router_outputs"], w["model"]
        assert c["routes_tokens"] == w["tokens"]
        assert c["plain_rerun_max_diff"] == c["capture_output_max_diff"] == c["replay_output_max_diff"] == 0
        assert c["recipe_output_max_diff"] == 0 and c["recipe_replay_output_max_diff"] == 0


def test_bytes_per_token(smoke: tuple[dict, str]) -> None:
    for w in smoke[0]["workloads"]:
        indices = w["layers"] * w["top_k"]
        b = w["bytes_per_token"]
        assert b["moe_replay"] == indices * mr.index_dtype(w["experts"]).itemsize
        assert b["recipe"] == b["naive"] == indices * 8  # int64 index tensors


def test_graph_replays_are_recorded_in_order(smoke: tuple[dict, str]) -> None:
    g = smoke[0]["graph"]
    c = g["checks"]
    assert c["check_graph_in_order"] and c["capture_graph_in_order"]
    assert c["check_graph_replays_matched"] == c["capture_graph_replays_matched"] == c["replays"] > 1
    # emulated graphs are the same eager step: every output agrees, so every replay is compared
    assert c["capture_vs_check_matched"] == c["capture_vs_check_compared"] == c["replays"]
    assert c["eager_replays_matched"] == c["eager_replays"] > 1
    assert c["rows_per_router"] == [c["replays"] * g["batch"]] * g["layers"]


def test_order_check_counts_replays_out_of_place() -> None:
    from benchmarks.graph import _blocks, _rows_in_order

    model = mr.models.build("softmax_topk", num_layers=2)
    inputs = torch.randint(0, model.config.vocab_size, (4, 3, 1), generator=torch.Generator().manual_seed(0))
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            for x in inputs:
                model(x)
        routes = session.routes()
        blocks = _blocks(routes, 3)
    assert len(blocks) == 4
    assert _rows_in_order(routes, blocks, 3) == {
        "rows_per_router": [12, 12],
        "replays_matched": 4,
        "replays_compared": 4,
        "in_order": True,
    }
    swapped = [blocks[1], blocks[0], *blocks[2:]]
    assert all(not torch.equal(a, b) for a, b in zip(blocks[0], blocks[1], strict=True))
    out = _rows_in_order(routes, swapped, 3)
    assert out["replays_matched"] == 2 and not out["in_order"]
    only = _rows_in_order(routes, swapped, 3, compare=[False, False, True, True])
    assert only["replays_matched"] == only["replays_compared"] == 2 and only["in_order"]


def test_training_step_and_generate_run_and_check(smoke: tuple[dict, str]) -> None:
    results, printed = smoke
    if transformers_version() is None:
        assert results["steps"] == []
        return
    steps = {w["shape"]: w for w in results["steps"]}
    assert set(steps) == {"train", "generate"}
    train, gen = steps["train"], steps["generate"]
    assert set(train["variants"]) == {"plain", "capture", "replay", "recipe_capture", "recipe_replay"}
    assert set(gen["variants"]) == {"plain", "capture", "recipe_capture"}
    for w in (train, gen):
        assert all(len(x["times_ms"]) == w["reps"] and x["median_ms"] > 0 for x in w["variants"].values())
        assert f"{w['model']} ({w['layers']}L" in printed
    c = train["checks"]
    assert c["routes_tokens"] == train["tokens"] == train["batch"] * train["seq"]
    assert c["recipe_records_per_step"] == 2  # the recompute ran: checkpointing was on
    assert c["recipe_indices_equal"]
    assert c["replay_loss_diff"] == c["replay_router_grad_max_diff"] == c["capture_loss_diff"] == 0
    c = gen["checks"]
    assert c["generated_tokens"] == gen["new"]
    assert c["routes_tokens"] == c["expected_tokens"] == gen["tokens"]
    assert c["capture_sequences_equal"] and c["recipe_indices_equal"]


def test_training_step_leaves_the_model_as_it_was() -> None:
    pytest.importorskip("transformers")
    from benchmarks.steps import bench_train
    from benchmarks.workloads import build_model

    model, _ = build_model("qwen3", "smoke", torch.device("cpu"), torch.float32, layers=1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()]
    out = bench_train(model, batch=1, seq=4, reps=1, inner=1)
    assert out["checks"]["routes_tokens"] == 4
    assert not model.training and not any(p.requires_grad or p.grad is not None for p in model.parameters())
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert hooks == [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()]


def test_markdown_has_a_row_per_workload(smoke: tuple[dict, str]) -> None:
    results, printed = smoke
    assert printed.strip() == report.markdown(results).strip()
    for w in results["workloads"]:
        assert f"| {w['model']} (" in printed
    assert "Smoke run" in printed


def test_targets_are_met_or_missed_by_the_measured_ratio() -> None:
    def workload(shape: str, capture: float) -> dict:
        v = {"ratio": capture, "ratio_q1": capture, "ratio_q3": capture, "median_ms": 1.0}
        return {"model": "reference", "shape": shape, "variants": {"capture": v}}

    results = {"meta": {"device_type": "cpu"}, "workloads": [workload("prefill", 1.04), workload("decode", 1.5)]}
    rows = report.targets(results)
    assert [(r["target"], r["met"]) for r in rows] == [("CPU reference prefill, capture", True)]
    results["workloads"][0]["variants"]["capture"]["ratio"] = 1.06
    assert not report.targets(results)[0]["met"]


def test_routers_the_recipe_does_not_fit_still_time_moe_replay() -> None:
    model = mr.models.build("topk_softmax", num_layers=2)  # returns (weights, indices): not the recipe's shape
    w = make_workload("reference", "prefill", model, {"layers": 2}, tokens=12, batch=1, past=0)
    routes, forced, checks, nbytes = check_workload(w)
    assert forced is None and "baselines_error" in checks
    assert checks["replay_output_max_diff"] == 0 and routes.num_tokens == 12
    assert set(nbytes) == {"moe_replay"}
    names = [v.name for v in eager_variants(w, 1, routes, forced)]
    assert names == ["plain", "idle", "capture", "replay"]
    with torch.no_grad():
        times = time_variants(eager_variants(w, 1, routes, forced), device=torch.device("cpu"), reps=1, inner=1)
    assert all(len(t) == 1 for t in times.values())


def test_capacity_benchmark_runs_and_growing_captures_record_the_same(tmp_path: Path) -> None:
    from benchmarks import capacity

    out = tmp_path / "capacity.json"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert capacity.main(["--smoke", "--device", "cpu", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    for r in results["ring"]:
        assert set(r["variants"]) == {"preallocated", "growing", "regrown", "wrapping"}
    for r in results["model"]:
        assert r["checks"]["same_routes"] and r["checks"]["segments_when_growing"] > 1
        assert set(r["variants"]) == {"plain", "capture_preallocated", "capture_growing"}


def test_sessions_benchmark_compiles_nothing_after_the_first_rollout_in_either_loop(tmp_path: Path) -> None:
    from benchmarks import sessions

    out = tmp_path / "sessions.json"
    with contextlib.redirect_stdout(io.StringIO()):
        assert sessions.main(["--smoke", "--device", "cpu", "--out", str(out)]) == 0
    loops = json.loads(out.read_text())["loops"]
    assert set(loops) == {"one session", "a session per rollout"}
    for loop in loops.values():
        frames = loop["frames_after_each_rollout"]
        assert len(frames) == 3 and frames[0] >= 1 and loop["compiled_after_the_first"] == 0
        assert loop["rows_as_eager"]


def test_router_call_benchmark_times_lean_and_mode_forwards(tmp_path: Path) -> None:
    from benchmarks import router_call

    out = tmp_path / "router.json"
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        assert router_call.main(["--smoke", "--device", "cpu", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert set(results["us"]) == {"plain", "idle", "capture", "replay", "capture (mode)", "replay (mode)"}
    assert all(v > 0 for v in results["us"].values())
    assert "| capture (mode) |" in text.getvalue()


def test_paired_benchmark_pairs_every_variant_in_both_roles(tmp_path: Path) -> None:
    from benchmarks import paired

    out = tmp_path / "paired.json"
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        assert paired.main(["--smoke", "--device", "cpu", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert set(results["decode"]) == set(paired.VARIANTS)
    for name in paired.VARIANTS:  # each variant ran against the plain copy, each copy in each role
        r = results["decode"][name]
        assert r["pairs"] == 2 * results["meta"]["steps"] and r["q1"] <= r["ratio"] <= r["q3"], name
    assert set(results["generate"]) == {"capture", "recipe_capture"}
    assert all(r["pairs"] == 2 for r in results["generate"].values())
    assert "| decode 64x1" in text.getvalue()


def test_the_copy_floor_copies_every_decision_and_puts_torch_topk_back() -> None:
    """The floor variant does what a capture at the call must: one copy of each router's top-k indices."""
    from benchmarks import paired
    from benchmarks.workloads import build_model

    model, _ = build_model("qwen3", "smoke", torch.device("cpu"), torch.float32)
    seen: list[torch.Tensor] = []
    for site in mr.find_routers(model):  # the indices each router returns ([logits, weights, indices])
        site.module.register_forward_hook(lambda m, i, o: seen.append(o[-1].clone()))
    forward = paired._copy_floor(model.forward)
    topk = torch.topk
    with torch.no_grad():
        forward(torch.randint(0, 64, (2, 5)))
    assert torch.topk is topk
    cells = dict(zip(forward.__code__.co_freevars, (c.cell_contents for c in forward.__closure__), strict=True))
    floor_topk = cells["topk"]
    state = dict(zip(floor_topk.__code__.co_freevars, (c.cell_contents for c in floor_topk.__closure__), strict=True))
    (slots,) = state["views"].values()
    assert state["count"] == [len(seen)] and len(seen) > 1
    for i, idx in enumerate(seen):
        assert torch.equal(slots[i].long(), idx)


def test_paired_ratios_take_the_variant_over_the_plain_step_in_alternating_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from benchmarks import paired

    now = [0.0]
    calls: list[str] = []
    monkeypatch.setattr(paired.time, "perf_counter", lambda: now[0])

    def run(name: str, seconds: float):
        def step() -> None:
            calls.append(name)
            now[0] += seconds

        return step

    ratios = paired.paired_ratios(torch.device("cpu"), 4, run("v", 3.0), run("p", 2.0))
    assert calls == ["v", "p", "p", "v", "v", "p", "p", "v"]
    assert ratios == [1.5] * 4


def test_paired_benchmark_runs_the_variants_asked_for_and_wrap_leaves_the_routers_as_they_were(
    tmp_path: Path,
) -> None:
    from benchmarks import paired
    from benchmarks.workloads import build_model, routers_of

    out = tmp_path / "paired.json"
    with contextlib.redirect_stdout(io.StringIO()):
        assert paired.main(["--smoke", "--device", "cpu", "--variants", "wrap", "idle", "--out", str(out)]) == 0
    assert set(json.loads(out.read_text())["decode"]) == {"wrap", "idle"}
    model, _ = build_model("qwen3", "smoke", torch.device("cpu"), torch.float32)
    routers = routers_of(model)
    with paired._variant("wrap", model, lambda: None, None):
        assert all("forward" in r.__dict__ for r in routers)
    assert not any("forward" in r.__dict__ for r in routers)


@pytest.mark.parametrize("name", ["wrap", "capture_nocopy", "capture_held", "copy_floor", *unchecked.NAMES])
def test_each_diagnostic_variant_runs_and_leaves_the_model_as_it_found_it(name: str) -> None:
    """Once broken: ``capture_held`` deleted the session's own forward on the model, so its detach refused."""
    from benchmarks import paired
    from benchmarks.workloads import build_model, make_workload

    model, info = build_model("qwen3", "smoke", torch.device("cpu"), torch.float32)
    work = make_workload("qwen3", "decode", model, info, tokens=0, batch=2, past=4, seed=0)
    before = {m: dict(m.__dict__) for m in model.modules()}
    with torch.no_grad():
        work.warm()
        with paired._variant(name, model, work.warm, None):
            work.prepare(1)
            work.forward()
    assert {m: dict(m.__dict__) for m in model.modules()} == before


def test_hostwork_counts_the_python_each_variant_adds_per_router_call(tmp_path: Path) -> None:
    from benchmarks import hostwork

    assert hostwork.count(lambda: None)["frames"] == 1
    out = tmp_path / "hostwork.json"
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        assert hostwork.main(["--variants", "idle", "capture", "replay", "wrap", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["wrap"]["frames"] == 1  # one plain layer per router call: its own frame, nothing else
    assert 0 < r["idle"]["bytecodes"] < r["capture"]["bytecodes"]
    assert r["capture"]["c_calls"] > r["idle"]["c_calls"]
    assert "| replay |" in text.getvalue()


def test_hostwork_counts_moe_replays_own_work_per_forward_and_per_generate_step(tmp_path: Path) -> None:
    from benchmarks import hostwork

    assert hostwork.count_own(lambda: None) == {"bytecodes": 0, "frames": 0, "c_calls": 0, "by_c_call": {}}
    own = hostwork.count_own(lambda: mr.format_sites([]))
    assert own["frames"] >= 1 and own["bytecodes"] > 0  # (the library's own frame, counted)
    out = tmp_path / "own.json"
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        assert hostwork.main(["--own", "--size", "smoke", "--layers", "2", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    routers = r["meta"]["routers"]
    for name in ("capture", "replay"):
        assert r[name]["bytecodes"] > 0 and r[name]["c_calls"] == sum(r[name]["by_c_call"].values())
        assert r[name]["by_c_call"]["torch.is_grad_enabled"] >= routers  # (a state read at every router call)
        assert r[name]["per_router_call"]["bytecodes"] == r[name]["bytecodes"] / routers
    assert r["generate_step"]["bytecodes"] > 0
    assert "| generate_step |" in text.getvalue()


def test_spans_times_every_router_call_of_each_variant_against_the_plain_one(tmp_path: Path) -> None:
    from benchmarks import spans

    out = tmp_path / "spans.json"
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        assert spans.main(["--smoke", "--device", "cpu", "--variants", "capture", "replay", "--out", str(out)]) == 0
    r = json.loads(out.read_text())["spans"]
    assert list(r) == ["plain", "capture", "replay"]
    assert r["plain"]["added_us"] == 0 and all(v["span_us"] > 0 and v["step_host_ms"] > 0 for v in r.values())
    assert r["capture"]["added_us"] == r["capture"]["span_us"] - r["plain"]["span_us"]  # one round
    assert "| capture |" in text.getvalue()


def test_instructions_runs_each_variant_and_reads_callgrinds_totals(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import instructions

    for variant in instructions.VARIANTS:  # what callgrind runs, here without it
        instructions.run_calls(variant, 2)
    report = "version: 1\ncmd: python\nevents: Ir I1mr D1mr D1mw\nfl=(1) x.c\n1 2 0 0 0\ntotals: 1200 30 4 5\n"
    assert instructions.collected(report) == {"Ir": 1200, "I1mr": 30, "D1mr": 4, "D1mw": 5}
    with pytest.raises(RuntimeError, match="totals"):
        instructions.collected("events: Ir\n")
    monkeypatch.setattr(instructions.shutil, "which", lambda name: None)
    assert instructions.main(["--calls", "1"]) == 2  # no valgrind: says so instead of a number


def test_paired_benchmark_runs_the_no_copy_diagnostic_and_puts_the_ring_write_back(tmp_path: Path) -> None:
    from benchmarks import paired
    from moe_replay.ring import CaptureRing

    write = CaptureRing.write_eager
    out = tmp_path / "paired.json"
    argv = ["--smoke", "--device", "cpu", "--generate-pairs", "0", "--out", str(out), "--variants"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert paired.main([*argv, "capture_nocopy"]) == 0
    decode = json.loads(out.read_text())["decode"]
    assert set(decode) == {"capture_nocopy"} and decode["capture_nocopy"]["pairs"] > 0
    assert CaptureRing.write_eager is write  # the diagnostic patches the library only while it runs


def test_first_step_benchmark_times_fresh_copies_and_leaves_the_model_as_it_was() -> None:
    """The first captured step (decisions established, token order told) records the routes the second does, on
    fresh copies of the model: the model handed in is left as it was, no session on it."""
    pytest.importorskip("transformers")
    from benchmarks.first_step import bench_first_step
    from benchmarks.workloads import build_model

    model, _ = build_model("qwen3", "smoke", torch.device("cpu"), torch.float32, layers=1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = bench_first_step(model, batch=2, seq=4, reps=1)
    assert out["checks"]["same_routes"]
    assert set(out) >= {"plain", "first", "second", "one_off_wall_s", "one_off_cpu_s"}
    assert not model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all("forward" not in m.__dict__ and not m._forward_hooks for m in model.modules())
