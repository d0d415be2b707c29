"""Command line: ``moe-replay {demo,inspect}`` (also ``python -m moe_replay``).

``demo`` runs the whole loop on a reference MoE; ``inspect`` prints the routers that
:func:`moe_replay.attach` would intercept in a reference model, a local HuggingFace
checkpoint directory or a tiny random instance of an HF model type.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__, _progress, models
from .discovery import find_routers, format_sites
from .errors import InvalidArgumentError, MissingDependencyError, MoEReplayError
from .metrics import compare
from .routes import Routes
from .session import attach


class _UsageError(Exception):
    """A command-line argument that names nothing usable; printed as ``error: ...``."""


class _OptionError(_UsageError):
    """An option refused for the model it is given with (``--seed`` of a checkpoint directory, ``--layers`` past what
    a reference model may hold): exit status 2, as an option argparse refuses."""


def _device(name: str) -> torch.device:
    """The torch device ``--device`` names, checked to be usable here."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise _UsageError(f"--device {name!r} is not a torch device; use cpu, cuda, cuda:1, mps, ...") from None
    if device.type == "meta":  # shapes only: no route, loss or gradient could be computed
        raise _UsageError(
            f"--device {name}: a meta tensor holds no values, and the demo computes with them; use cpu or cuda"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        why = (
            f"this torch ({torch.__version__}) is a CPU-only build"
            if torch.version.cuda is None
            else "no CUDA device is visible"
        )
        raise _UsageError(f"--device {name}: {why}; run with --device cpu or install a CUDA build of torch")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0][:160]
        raise _UsageError(f"--device {name} cannot be used: {first}") from None
    return device


def _mismatch(a: Routes, b: Routes) -> tuple[float, list[float]]:
    """Fraction of router decisions (the set of k experts) that differ, overall and per router."""
    c = compare(a, b)
    return c.overall, [float(x) for x in c.per_layer]


def demo(
    style: str = "softmax_topk",
    new_tokens: int = 16,
    seed: int = 0,
    device: str = "cpu",
    *,
    progress: bool | None = None,
) -> dict[str, float]:
    """Capture while generating, perturb the routers, replay; print and return the figures.

    ``progress`` draws a bar on stderr over the generated tokens: ``None`` where stderr is a
    terminal (``MOE_REPLAY_PROGRESS=0`` or ``1`` decides instead where set), ``True`` always,
    ``False`` never. It changes nothing else.
    """
    progress = _progress.check(progress, "demo()")
    torch.manual_seed(seed)
    if new_tokens < 1:
        raise InvalidArgumentError(f"new_tokens must be at least 1, got {new_tokens}")
    positions = max(512, 8 + new_tokens)  # the prompt's 8 tokens and every generated one
    top_k = 1 if style == "top1_argmax" else 2  # (a top-1 style reads no top_k: build refuses another)
    model = models.build(style, seed=seed, num_layers=4, num_experts=16, top_k=top_k, max_positions=positions).to(
        device
    )
    cfg = model.config
    prompt = torch.randint(0, cfg.vocab_size, (1, 8), device=device)
    session = attach(model)
    print(f"model: reference MoE '{style}', {cfg.num_layers} layers, {cfg.num_experts} experts, top-{cfg.top_k}")
    print()

    # 1. rollout: capture while generating (the last sampled token is never routed)
    with session.capture():
        seq = model.generate(prompt, max_new_tokens=new_tokens, progress=progress)
    rollout = session.routes()
    tokens = seq[:, :-1]
    print(f"1. captured {rollout.num_tokens} tokens x {rollout.num_layers} routers while generating {new_tokens}")
    print(
        f"   (the prompt's {prompt.shape[1]}, then {rollout.num_tokens - prompt.shape[1]} generated: "
        "the last sampled token is never fed back, so never routed)"
    )
    print(f"   {rollout}")

    # 2. policy update stand-in: perturb the router weights, look at the drift
    with torch.no_grad():
        for s in session.sites:
            w: torch.Tensor = getattr(s.module, "weight")  # noqa: B009 - a module's weight is typed as Tensor | Module
            w.add_(0.3 * w.std() * torch.randn_like(w))
    with session.capture(), torch.no_grad():
        model(tokens)
    free = session.routes()
    drift, per_layer = _mismatch(rollout, free)
    print(f"2. perturbed the routers: a free forward routes {drift:.1%} of decisions differently")
    print("   per router: " + ", ".join(f"{d:.0%}" for d in per_layer))

    # 3. replay: forced routes, gradients into the routers
    model.zero_grad()
    with session.replay(rollout), session.capture():
        loss = model(tokens, labels=tokens).loss
        loss.backward()
    forced = session.routes()
    replay_drift, _ = _mismatch(rollout, forced)
    grads = [float(getattr(s.module, "weight").grad.norm()) for s in session.sites]  # noqa: B009 - as above
    print(f"3. replayed the rollout's routes: {replay_drift:.1%} of decisions differ, loss {loss.item():.4f}")
    print("   router gradient norms: " + ", ".join(f"{g:.2e}" for g in grads))
    print()
    print("the routers, as the session found and ran them:")  # (after the work: how each one ran, not "not yet")
    print(session.table())
    session.detach()
    ok = replay_drift == 0.0 and all(g > 0 for g in grads)
    print()
    print("OK: replay reproduced every recorded route and gradients reached every router" if ok else "FAILED")
    return {"free_drift": drift, "replay_drift": replay_drift, "min_grad": min(grads)}


# --------------------------------------------------------------------------- inspect
def load_model(target: str, *, seed: int | None = None, layers: int | None = None) -> tuple[nn.Module, str]:
    """The model ``inspect`` looks at, and one line describing where it came from.

    ``target`` is a reference style (:data:`moe_replay.models.STYLES`), a local HF
    checkpoint directory (``config.json`` + weights), or an HF model type such as
    ``qwen3_moe`` (a tiny random instance; needs transformers). ``seed`` (default 0) and ``layers`` shape a random
    model; for a checkpoint directory, loaded as saved, they are refused rather than ignored.
    """
    from . import _hf

    if _hf.is_checkpoint_dir(target) and target not in models.STYLES:
        given = [f"--{name} {value}" for name, value in (("seed", seed), ("layers", layers)) if value is not None]
        if given:
            raise _OptionError(
                f"{' and '.join(given)} {'shape' if len(given) > 1 else 'shapes'} a random model, but {target} is a "
                "checkpoint directory, loaded with "
                "the weights and layers it was saved with: leave them out"
            )
    seed = 0 if seed is None else seed
    extra: dict[str, Any] = {}
    if target in models.STYLES:
        if layers is not None:
            extra["num_layers"] = layers
        try:
            reference = models.build(target, seed=seed, **extra)
        except InvalidArgumentError as e:
            if layers is None:
                raise
            raise _too_big(e, f"--layers {layers}") from None
        cfg = reference.config
        return reference, (
            f"reference MoE '{target}': {cfg.num_layers} layers, {cfg.num_experts} experts, top-{cfg.top_k}"
        )
    if _hf.is_checkpoint_dir(target):
        try:
            model = _hf.load_checkpoint(target)
        except (MoEReplayError, ImportError):
            raise
        except Exception as e:  # transformers' own: no weights, a config.json that is no JSON, an unknown type
            raise _UsageError(f"cannot load the checkpoint directory {target}: {_first_line(e)}") from None
        return model, f"{type(model).__name__} loaded from the checkpoint directory {target}"
    if Path(target).exists() or "/" in target or "\\" in target:
        raise _UsageError(
            f"'{target}' is not a checkpoint directory (a directory with a config.json). Models are not "
            "downloaded: save one with model.save_pretrained(path) and pass that path"
        )
    try:
        model = _hf.tiny_model(target, seed=seed, **({"layers": layers} if layers is not None else {}))
    except ValueError as e:
        raise _UsageError(f"{e}; reference styles are {', '.join(models.STYLES)}") from None
    except MissingDependencyError:  # a typo of a reference style lands here too: name both readings
        raise _UsageError(
            f"'{target}' is not a reference style ({', '.join(models.STYLES)}) nor a checkpoint directory; "
            "read as an HF model type it needs HuggingFace transformers, which is not installed: "
            "pip install 'moe_replay[hf]'"
        ) from None
    except (MoEReplayError, ImportError):
        raise
    except Exception as e:  # transformers could not build this type from its default config
        raise _UsageError(f"cannot build a tiny random '{target}': {_first_line(e)}") from None
    origin = f"{type(model).__name__}: a tiny random instance of the HF model type '{target}'"
    depth = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if layers is not None and isinstance(depth, int) and depth < layers:  # capped: say so, not only in --help
        origin += f", {depth} layers (its default depth; --layers {layers} asks for more)"
    return model, origin


def _too_big(e: InvalidArgumentError, option: str) -> Exception:
    """A usage error naming ``option`` for a reference model the option makes too big to build, whose message names
    the config's fields (which no option of this command sets); ``e`` itself where it says something else."""
    size = str(e).split(": use smaller sizes", 1)
    if len(size) != 2:
        return e
    return _OptionError(f"{option}: {size[0]}; ask for fewer {option.split()[0]}")


def _first_line(e: BaseException) -> str:
    """``Type: first line`` of an exception, for a one-line error."""
    text = (str(e).strip().splitlines() or [""])[0][:300]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _example_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """A small batch of token ids for a dry run."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int):
        get = getattr(model, "get_input_embeddings", None)
        vocab = int(getattr(get() if callable(get) else None, "num_embeddings", 2))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0)).to(device)
    inputs = {"input_ids": ids}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids
    return inputs


def inspect_model(
    target: str,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    top_k: int | None = None,
    num_experts: int | None = None,
    verify: bool = False,
    seed: int | None = None,
    layers: int | None = None,
    progress: bool | None = None,
) -> str:
    """The router table of a model (see :func:`load_model` for what ``target`` can be).

    With ``verify``, one forward on 8 random tokens checks that every router runs and
    that its decision call is seen; ``progress`` shows (``True``) or hides (``False``) its bar
    over the routers, which ``None`` shows where stderr is a terminal.
    """
    return _inspect(target, include, exclude, top_k, num_experts, verify, seed, layers, progress)[0]


def _inspect(
    target: str,
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
    top_k: int | None,
    num_experts: int | None,
    verify: bool,
    seed: int | None,
    layers: int | None,
    progress: bool | None,
) -> tuple[str, str]:
    """:func:`inspect_model`'s table, and why a ``verify`` asked for ran no forward (attach() refuses routers of the
    model); an empty string where it ran, or was not asked for."""
    progress = _progress.check(progress, "inspect_model()")
    model, origin = load_model(target, seed=seed, layers=layers)
    sites = find_routers(
        model,
        include=list(include) if include else None,
        exclude=list(exclude) if exclude else None,
        top_k=top_k,
        num_experts=num_experts,
    )
    refused = [s for s in sites if s.unsupported]
    lines = [f"model: {origin}", format_sites(sites), ""]
    # Before a forward, a router is only not refused by its source: its decision is proven at
    # its first forward, so only --verify may call the routers replayable.
    kept = "replayable" if verify and not refused else "not refused before a forward"
    lines.append(
        f"{len(sites)} router(s), {len(sites) - len(refused)} {kept}"
        + (
            f"; attach() refuses {len(refused)}: exclude them with --exclude to replay the others"
            if 0 < len(refused) < len(sites)
            else "; attach() refuses this model: none of its routers can be replayed exactly"
            if refused
            else ""
        )
    )
    if verify and not refused:
        with attach(
            model,
            include=list(include) if include else None,
            exclude=list(exclude) if exclude else None,
            top_k=top_k,
            num_experts=num_experts,
        ) as session:
            with _progress.setting(progress):  # (verify() takes the model's arguments: its bar is set here)
                calls = session.verify(**_example_inputs(model))
        runs = sorted(set(calls.values()))
        lines.append(
            f"verify: one forward on 8 tokens ran every router ({', '.join(map(str, runs))} call(s) each) "
            "and established each decision by its effect:"
        )
        lines.extend(str(calls).splitlines()[1:])
    elif verify:
        lines.append("verify: skipped, some routers are refused")
        why = (
            "none of its routers can be replayed exactly, so there is nothing to verify"
            if len(refused) == len(sites)
            else "--exclude them to verify the others"
        )
        return "\n".join(lines), (
            f"--verify ran no forward: attach() refuses {len(refused)} router(s) of this model (marked 'refused' "
            f"above); {why}"
        )
    elif not refused:
        lines.append(
            "each decision is proven at its router's first forward, where attach() may still refuse it: "
            "--verify runs that forward now"
        )
    return "\n".join(lines), ""


# --------------------------------------------------------------------------- parser
_DESCRIPTION = """\
Capture and replay the routing of PyTorch Mixture-of-Experts models.
Run `python -m moe_replay COMMAND --help` for the options and examples of a command."""

#: The program name shown in help: the installed console script's, or the module's.
PROG = "moe-replay"
MODULE_PROG = "python -m moe_replay"

_EPILOG = """\
examples:
  python -m moe_replay demo                       # the whole loop, on CPU in seconds
  python -m moe_replay inspect qwen3_moe          # the routers of a tiny random Qwen3-MoE
  python -m moe_replay inspect ./my-checkpoint    # the routers of a saved HF model"""

_DEMO_EPILOG = """\
examples:
  python -m moe_replay demo
  python -m moe_replay demo --style grouped_sigmoid --new-tokens 32
  python -m moe_replay demo --device cuda

The exit status is 0 when replay reproduced every recorded route and gradients reached
every router, 1 otherwise, and 2 when --device cannot be used here or --new-tokens is
not a positive count or more positions than a reference model may hold."""

_INSPECT_EPILOG = f"""\
MODEL is one of:
  a reference style     {", ".join(models.STYLES)}
  a checkpoint folder   a local directory written by save_pretrained (config.json +
                        weights); nothing is downloaded
  an HF model type      e.g. qwen3_moe, mixtral, deepseek_v3, olmoe: a tiny random
                        instance built from that type's default config, shrunk
The last two need HuggingFace transformers (pip install 'moe_replay[hf]').

examples:
  python -m moe_replay inspect softmax_topk
  python -m moe_replay inspect qwen3_moe --verify
  python -m moe_replay inspect ./my-checkpoint --exclude '*.shared_expert_gate'
  python -m moe_replay inspect ./my-model --include 'layers.*.moe.router' --top-k 2

Columns: router (module path), class, E (experts), k (experts per token), and how the
decision call is intercepted. Routers marked 'refused' make attach() raise.

The exit status is 0 when the table is printed (and --verify ran every router), 1 when
the model cannot be loaded or attach() refuses it (--verify could not run because attach()
refuses some router), and 2 for an option that is not valid or that this model refuses
(--top-k over its experts, an --include that matches nothing, --seed of a checkpoint),
as the same command without that option runs."""


def _positive(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seed(text: str) -> int:
    """An argparse type: a seed torch takes (``torch.manual_seed``: a 64-bit integer)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not -(2**63) <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must fit in 64 bits ({-(2**63)} to {2**64 - 1}), got {value}")
    return value


def _pattern(text: str) -> str:
    """An argparse type: a module name or glob, not empty (an empty one names the whole model)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            f"{text!r} is empty: give a module path or glob, e.g. 'layers.*.mlp.gate' (an unset shell variable?)"
        )
    return text


def _parser(prog: str = PROG) -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter

    def named(text: str) -> str:
        return text.replace(MODULE_PROG, prog)

    parser = argparse.ArgumentParser(
        prog=prog, description=named(_DESCRIPTION), epilog=named(_EPILOG), formatter_class=fmt
    )
    parser.add_argument("--version", action="version", version=f"moe_replay {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    p = sub.add_parser(
        "demo",
        help="capture while generating, perturb the routers, replay with gradients",
        description=textwrap.dedent("""\
            Build a 4-layer reference MoE, record the experts every router chooses while it
            generates, perturb the router weights (a stand-in for a policy update), show how
            many routing decisions a free forward now changes, then replay the recorded routes
            in a training forward and backward and check that every route was reproduced and
            every router got a gradient."""),
        epilog=named(_DEMO_EPILOG),
        formatter_class=fmt,
    )
    p.add_argument("--style", default="softmax_topk", choices=models.STYLES, help="router style of the reference MoE")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens to generate (default 16)")
    p.add_argument("--seed", type=_seed, default=0, help="seed for weights and prompt (default 0)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    _progress_option(p, "the generated tokens")
    q = sub.add_parser(
        "inspect",
        help="print the routers of a reference model, a local HF checkpoint or an HF model type",
        description=textwrap.dedent("""\
            Print the router table of a model: every module that attach() would intercept, its
            expert count E, its top-k and how its decision call is intercepted."""),
        epilog=named(_INSPECT_EPILOG),
        formatter_class=fmt,
    )
    q.add_argument("model", metavar="MODEL", help="reference style, checkpoint directory or HF model type")
    q.add_argument(
        "--include",
        action="append",
        type=_pattern,
        metavar="PATTERN",
        help="take exactly the modules matching this name or glob as routers (repeatable)",
    )
    q.add_argument(
        "--exclude",
        action="append",
        type=_pattern,
        metavar="PATTERN",
        help="drop the routers matching this name or glob (repeatable)",
    )
    q.add_argument("--top-k", type=_positive, help="k for every router, when the model does not say")
    q.add_argument("--num-experts", type=_positive, help="expert count for every router, when its weight does not say")
    q.add_argument(
        "--verify", action="store_true", help="also run one forward on random tokens and check that every router fires"
    )
    q.add_argument(
        "--layers",
        type=_positive,
        help="layer count of a reference model; of a tiny random HF model, at most its default depth",
    )
    q.add_argument("--seed", type=_seed, default=None, help="seed of a random model's weights (default 0)")
    _progress_option(q, "the routers --verify establishes")
    return parser


def _progress_option(parser: argparse.ArgumentParser, over: str) -> None:
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"a progress bar on stderr over {over} (default: shown where stderr is a terminal)",
    )


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """Entry point of ``moe-replay`` and ``python -m moe_replay``; returns the exit status."""
    args = _parser(prog).parse_args(argv)
    if args.command == "demo":
        try:
            device = _device(args.device)
            if args.new_tokens < 1:
                raise _UsageError(f"--new-tokens must be at least 1, got {args.new_tokens}")
        except _UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        try:
            out = demo(args.style, args.new_tokens, args.seed, str(device), progress=args.progress)
        except InvalidArgumentError as e:  # a --new-tokens the reference model cannot hold the positions of
            usage = _too_big(e, f"--new-tokens {args.new_tokens}")
            print(f"error: {usage}", file=sys.stderr)
            return 2 if isinstance(usage, _UsageError) else 1
        except MoEReplayError as e:  # a refusal on this device or torch: its message, not a traceback
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0 if out["replay_drift"] == 0.0 and out["min_grad"] > 0 else 1
    try:
        table, refused = _inspect(
            args.model,
            args.include,
            args.exclude,
            args.top_k,
            args.num_experts,
            args.verify,
            args.seed,
            args.layers,
            args.progress,
        )
    except (_UsageError, MoEReplayError, ImportError) as e:
        print(f"error: {_as_options(str(e))}", file=sys.stderr)
        return 2 if isinstance(e, _OptionError) or _refused_for_options(args, e) else 1
    print(table)
    if refused:  # (the check asked for did not run: not a success a script may take for one)
        print(f"error: {refused}", file=sys.stderr)
        return 1
    return 0


def _refused_for_options(args: argparse.Namespace, error: BaseException) -> bool:
    """Whether ``error``, raised by ``inspect`` with router options (``--include``, ``--exclude``, ``--top-k``,
    ``--num-experts``), is those options': the same command without them runs clean. Such an error is a usage error
    (exit status 2, as an option argparse refuses), where one the model raises whatever the options is status 1.
    Run only on the way out of a refusal: the model is loaded (and verified) once more."""
    options = (args.include, args.exclude, args.top_k, args.num_experts)
    if not isinstance(error, MoEReplayError) or all(o is None for o in options):
        return False
    try:
        _inspect(args.model, None, None, None, None, args.verify, args.seed, args.layers, False)
    except Exception:  # (the model's own refusal: the options are not what is refused)
        return False
    return True


def _as_options(message: str) -> str:
    """A library message in this command's words: ``--include 'x'`` where it says ``include='x'``."""
    message = re.sub(r"mr\.attach\(model, (\w+)=('[^']*')\)", lambda m: f"--{m[1]} {m[2]}", message)
    message = message.replace(" or include=MyRouterClass", "")
    # (a pattern given here is a str: the command line has no re.compile, and reads no regex)
    message = message.replace(
        "for a regex pass re.compile(...)", "a regular expression is not read here: write a glob, 'layers.*.mlp.gate'"
    )
    message = re.sub(
        r"\b(include|exclude|top_k|num_experts)=(\S?)",
        lambda m: f"--{m[1].replace('_', '-')}" + (f" {m[2]}" if m[2] and m[2] not in ",./;)" else m[2]),
        message,
    )
    # the bare argument names ("leave top_k out"), not attributes (config.top_k) nor words inside names
    return re.sub(r"(?<![\w.\-'\"])(top_k|num_experts)(?![\w'\"(])", lambda m: f"--{m[1].replace('_', '-')}", message)


if __name__ == "__main__":
    sys.exit(main(prog=MODULE_PROG))
