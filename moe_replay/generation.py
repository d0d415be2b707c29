"""Per-sequence routes from a capture taken while generating.

A capture records rows in call order. For a batch of ``B`` prompts padded to ``P``
tokens, ``generate()`` (transformers, or any decode loop with a KV cache) runs:

* one prompt forward: ``B * P`` rows, batch-major (sequence 0's positions, then
  sequence 1's...), padding positions included;
* one forward per decode step, each of ``B`` rows: the token sampled at step ``t`` is
  fed at step ``t + 1``.

``N`` new tokens take ``N - 1`` decode steps: the last sampled token is never fed back,
so it has no route. Inference engines (vLLM, SGLang) behave the same way. In the
per-sequence routes that :func:`split_generation` returns, the last token of every
sequence has a -1 row: replay routes it natively. Its route cannot change the loss: no
later position attends to it and its logits predict nothing that is trained on. (A decode
loop of one's own that feeds it too records ``B * (P + N)`` rows: given ``sequences``, its
last token gets its route.)

Sequences that stopped early (an end-of-sequence token) keep being fed padding by
transformers' ``generate()`` until the whole batch stops; those rows, like prompt
padding, are dropped (or marked -1 with ``keep_padding=True``).

The routes of a capture also remember what the model's forwards were fed, and
:func:`split_generation` refuses what would give tokens the routes of others: a capture
during which the KV cache moved rows between forwards (beam search), one whose forwards
were given KV caches in turn (classifier-free guidance), a prompt mask other than the one
``generate()`` ran with, and ``sequences`` whose tokens are not those their
rows were fed.

Example:
    >>> import torch, moe_replay as mr
    >>> model = mr.models.build("softmax_topk")
    >>> prompt = torch.randint(1, 128, (2, 4))
    >>> mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])      # sequence 0 is left-padded
    >>> with mr.attach(model) as session:
    ...     with session.capture():
    ...         out = model.generate(prompt, max_new_tokens=3, attention_mask=mask)
    ...     seqs = mr.split_generation(session.routes(), attention_mask=mask)
    >>> [s.num_tokens for s in seqs]                              # real prompt + 3 new tokens
    [6, 7]
    >>> bool(seqs[0].missing[-1].all())                           # the last token: no route
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._checks import as_tensor, check_count, check_flag, check_values, is_integer, is_one_of
from ._feeds import HELD_FEWER, PLAIN_REORDERED, SHRINKS
from ._progress import Progress, check
from .batch import take_rows
from .errors import (
    ArgumentTypeError,
    InvalidArgumentError,
    RoutesValidationError,
)
from .routes import Routes, _known_or_none, in_token_order

__all__ = ["generation_capacity", "generation_lengths", "split_generation"]


def _integers(values: object, what: str) -> torch.Tensor:
    """``values`` as a 1-D int64 tensor; floats, bools and strings are refused, never cut (2.9 is not 2)."""
    check_values(values, what, InvalidArgumentError)
    try:
        t = as_tensor(values)
    except (TypeError, ValueError, RuntimeError) as e:
        raise InvalidArgumentError(f"{what} must be integers, got {values!r:.80}: {e}") from None
    if t.numel() == 0:
        return t.long().reshape(-1)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise InvalidArgumentError(f"{what} must be integers, got {t.tolist()!r:.80}")
    return t.long().reshape(-1)


def _as_mask(attention_mask: object) -> torch.Tensor:
    # (meta, sparse, nested, quantized: no 0/1 values to read, and torch's own error at the first comparison)
    check_values(attention_mask, "attention_mask", InvalidArgumentError)
    try:
        mask = as_tensor(attention_mask)
    except (TypeError, ValueError, RuntimeError) as e:
        raise InvalidArgumentError(
            f"attention_mask must be a [batch, prompt_len] tensor of 0/1, got a {type(attention_mask).__name__} "
            f"({e}); pass the attention mask given to generate()"
        ) from None
    if mask.dim() != 2:
        raise InvalidArgumentError(f"attention_mask must be [batch, prompt_len], got shape {tuple(mask.shape)}")
    if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        odd = mask[(mask != 0) & (mask != 1)].unique()[:4].tolist() if not mask.is_complex() else "complex"
        raise InvalidArgumentError(
            f"attention_mask must hold 1 for a token and 0 for padding, got values {odd}: an additive mask "
            "(0 for a token, -inf or a large negative number for padding) marks tokens the other way round; pass "
            "the 0/1 mask given to generate() (for an additive one: (attention_mask == 0).long())"
        )
    return mask


def generation_capacity(batch_size: int, prompt_len: int, max_new_tokens: int) -> int:
    """Rows per router that a capture around one ``generate()`` call needs, at most.

    ``batch_size * (prompt_len + max_new_tokens)``: every padded prompt position, and one
    row per sequence per new token. ``generate()`` records ``B * P + B * (N - 1)`` rows
    (the last token is never fed back); a decode loop that feeds it records ``B * (P + N)``.
    Count ``batch_size`` as the sequences generated (prompts x ``num_return_sequences``).
    Pass it to :meth:`Session.reserve` before capturing a CUDA graph or compiling, or as
    ``capture(expected_tokens=...)``, so that a graphed rollout fits the first time.

    Example:
        >>> import moe_replay as mr
        >>> mr.generation_capacity(batch_size=64, prompt_len=512, max_new_tokens=1024)
        98304
    """
    b, p, n = (
        check_count(v, name)
        for name, v in (("batch_size", batch_size), ("prompt_len", prompt_len), ("max_new_tokens", max_new_tokens))
    )
    return b * (p + n)


def generation_lengths(
    sequences: torch.Tensor,
    prompt_len: int,
    eos_token_id: int | Sequence[int] | None,
) -> torch.Tensor:
    """New tokens per sequence, up to and including the first end-of-sequence token.

    Args:
        sequences: ``[B, prompt_len + N]`` as ``generate()`` returns them.
        prompt_len: padded prompt width ``P``.
        eos_token_id: one id or several; ``None`` means every sequence ran all ``N`` steps.
            A negative id, or an empty list of ids, is refused: it matches no token, so it would
            read every sequence as never ended (pass ``None`` for that).

    Example:
        >>> import torch, moe_replay as mr
        >>> out = torch.tensor([[5, 6, 7, 2, 0], [5, 6, 8, 9, 4]])  # prompt of 2, then 3 new tokens
        >>> mr.generation_lengths(out, prompt_len=2, eos_token_id=2).tolist()  # the first ended at its eos
        [2, 3]
    """
    if not isinstance(sequences, torch.Tensor) or sequences.dim() != 2:
        raise InvalidArgumentError(
            f"sequences must be the [batch, prompt_len + new] tensor generate() returns, got "
            f"{tuple(sequences.shape) if isinstance(sequences, torch.Tensor) else type(sequences).__name__}"
        )
    _check_token_ids(sequences)
    # (a numpy integer or a 0-d tensor is taken, as generation_capacity and split_generation take it)
    if not is_integer(prompt_len) or not 0 <= int(prompt_len) <= sequences.shape[1]:
        raise InvalidArgumentError(
            f"prompt_len must be an int from 0 to the sequences' width {sequences.shape[1]}, got {prompt_len!r}"
        )
    new = sequences[:, int(prompt_len) :]
    b, n = new.shape
    if eos_token_id is None:
        return torch.full((b,), n, dtype=torch.long)
    eos = _integers(eos_token_id, "eos_token_id")
    if eos.numel() == 0:  # (more likely a list that was never filled than a way of saying "none")
        raise InvalidArgumentError(
            f"eos_token_id is empty ({eos_token_id!r:.40}): it holds no id to find, so every sequence would be read "
            "as running all its steps. Pass the tokenizer's eos_token_id (or generation_config.eos_token_id), one id "
            "or several, or None if no sequence stopped early"
        )
    if bool((eos < 0).any()):
        # no token id is negative, so such an id matches no token and every sequence would read as never ended
        raise InvalidArgumentError(
            f"eos_token_id must be token ids >= 0, got {eos.tolist()!r:.80}: a negative id matches no token, so "
            "every sequence would be read as running all its steps. Pass the tokenizer's eos_token_id (or "
            "generation_config.eos_token_id), or None if no sequence stopped early"
        )
    eos = eos.to(new.device)
    if n == 0:
        return torch.full((b,), n, dtype=torch.long)
    hit = torch.isin(new.long(), eos)
    first = torch.where(hit.any(dim=1), hit.long().argmax(dim=1) + 1, torch.full((b,), n))
    return first.long()


def _check_token_ids(sequences: torch.Tensor) -> None:
    """Refuse ``sequences`` that hold no token ids (floats, bools, a meta tensor): read as ids they would be cut to
    other ids."""
    check_values(sequences, "sequences", InvalidArgumentError)
    dtype = sequences.dtype
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise InvalidArgumentError(
            f"sequences must hold integer token ids, as generate() returns them; got {dtype}, whose values read as "
            "ids would be cut to other ids (2.7 to 2). Pass the sequences generate() returned"
        )


def _prompt_mask(
    batch_size: int,
    prompt_len: int,
    attention_mask: torch.Tensor | None,
    prompt_lengths: Sequence[int] | torch.Tensor | None,
    padding_side: str,
) -> torch.Tensor:
    if attention_mask is not None:
        if prompt_lengths is not None:
            raise InvalidArgumentError("pass attention_mask or prompt_lengths, not both")
        mask = _as_mask(attention_mask)
        if mask.dim() != 2 or mask.shape[0] != batch_size or mask.shape[1] < prompt_len:
            raise InvalidArgumentError(
                f"attention_mask must be [batch, >= prompt_len] = [{batch_size}, >= {prompt_len}], "
                f"got {tuple(mask.shape)}"
            )
        return mask[:, :prompt_len].bool().cpu()
    if prompt_lengths is None:
        return torch.ones(batch_size, prompt_len, dtype=torch.bool)
    lengths = _integers(prompt_lengths, "prompt_lengths")
    if lengths.numel() != batch_size or bool((lengths > prompt_len).any()) or bool((lengths < 0).any()):
        raise InvalidArgumentError(
            f"prompt_lengths must be {batch_size} values in 0..{prompt_len}, got {lengths.tolist()}"
        )
    if not is_one_of(padding_side, ("left", "right")):
        raise InvalidArgumentError(f"padding_side must be 'left' or 'right', got {padding_side!r:.60}")
    pos = torch.arange(prompt_len)
    if padding_side == "left":
        return pos[None, :] >= prompt_len - lengths[:, None]
    return pos[None, :] < lengths[:, None]


def _batch_size(
    batch_size: int | None,
    attention_mask: torch.Tensor | None,
    prompt_lengths: Sequence[int] | torch.Tensor | None,
    sequences: torch.Tensor | None,
) -> int:
    """``B``, the sequences generated: the one count that every argument giving it agrees on.

    ``generate(num_return_sequences=n)`` generates ``n`` sequences per prompt, so its
    capture and ``sequences`` hold ``n`` times the rows of the prompt mask it was given.
    """
    counts: dict[str, int] = {}
    if batch_size is not None:
        counts["batch_size"] = check_count(batch_size, "batch_size")
    if attention_mask is not None:
        counts["attention_mask"] = int(_as_mask(attention_mask).shape[0])
    if prompt_lengths is not None:
        counts["prompt_lengths"] = len(_integers(prompt_lengths, "prompt_lengths"))
    if sequences is not None:
        counts["sequences"] = int(as_tensor(sequences).shape[0])
    if not counts or min(counts.values()) < 1:
        raise InvalidArgumentError("give batch_size (or attention_mask, prompt_lengths or sequences to infer it)")
    if len(set(counts.values())) == 1:
        return next(iter(counts.values()))
    said = {"batch_size": "batch_size={}", "prompt_lengths": "prompt_lengths has {} values"}
    given = ", ".join(said.get(name, name + " has {} rows").format(n) for name, n in counts.items())
    prompts = {counts[k] for k in ("attention_mask", "prompt_lengths") if k in counts}
    generated = {counts[k] for k in ("sequences", "batch_size") if k in counts}
    hint = ""
    if len(prompts) == len(generated) == 1 and min(generated) % min(prompts) == 0:
        n = min(generated) // min(prompts)
        hint = (
            f". With generate(num_return_sequences={n}) each prompt gives {n} sequences, and the capture holds "
            f"rows for all {min(generated)}: repeat the prompt mask per returned sequence, "
            f"attention_mask.repeat_interleave({n}, dim=0) (prompt_lengths likewise)"
        )
    raise InvalidArgumentError(f"the arguments disagree on the batch size: {given}{hint}")


def _runs(sizes: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """``sizes`` as ``(size, repeats)`` runs, zeros left out."""
    runs: list[list[int]] = []
    for size in sizes:
        if runs and runs[-1][0] == size:
            runs[-1][1] += 1
        elif size:
            runs.append([size, 1])
    return tuple((size, count) for size, count in runs)


def _check_forwards(
    calls: tuple[tuple[int, int], ...] | None, b: int, p: int, n: int, *, returned: bool = False
) -> None:
    """The capture's forwards are one ``generate()`` call's: ``b * p`` prompt rows, then ``n - 1`` steps of ``b``.

    The row count alone also fits other forwards in another order: two ``generate()`` calls
    of ``b / 2`` sequences each (their outputs concatenated), a chunked prefill, a prompt
    mask of fewer rows than the sequences generated (``num_return_sequences``). The routes
    that :meth:`Session.routes` returns remember their forwards (saved and loaded too, and
    slices ``routes[a:b]`` the rows of them they hold); other routes (joined with routes of
    unknown forwards, built) do not, and are split by the row count alone.

    ``returned``: ``b`` is the row count of ``generate()``'s output. A capture of ``r``
    times as many sequences then is no ``num_return_sequences`` (its output holds every
    sequence generated) but a beam search, which returns fewer than it runs.
    """
    want = _runs([b * p, *[b] * (n - 1)])
    if calls is None or calls == want:
        return
    seen = ", ".join(f"{size}" if count == 1 else f"{size} x{count}" for size, count in calls[:8])
    if len(calls) > 8:
        seen += ", ..."
    hint = (
        "more than one generate() in the capture() block (capture each call in its own block, or split each "
        "call's rows on its own), a chunked prefill (prefill_chunk_size), generate(use_cache=False) (each step "
        "routes the whole sequence again), assisted decoding, or a generate() continued from an earlier call's "
        "past_key_values (only the uncached tokens are routed)"
    )
    (first, once), rest = calls[0], calls[1:]
    if once > 1 and first == b * p and len(rest) == 1 and rest[0][0] == b and rest[0][1] % once == 0:
        hint = (
            f"a model whose routers each run {once} times per forward (one MoE block shared by several layers, or a "
            "loop over one: each token then has a row per call, and split_generation, which gives each token one "
            "row per router, cannot split such a capture; replay it in forwards like the captured ones, the prompts "
            f"and then one new token per sequence at each step), or {hint}"
        )
    m = first // p if p else 0
    if (
        once == 1
        and m > b
        and m % b == 0
        and first == m * p
        and all(size == m for size, _ in rest[:1])
        and len(rest) <= 1
    ):
        r = m // b
        beams = (
            f"a beam search: generate() ran {m} hypotheses, {r} per {'returned sequence' if returned else 'mask row'} "
            "(num_beams > 1), and reordered them between steps, so its rows cannot be split per sequence; sample or "
            "decode greedily"
        )
        hint = (
            beams
            if returned
            else (
                f"one generate() over {m} sequences: with generate(num_return_sequences={r}) each prompt gives {r}, "
                f"so pass the prompt mask repeated per returned sequence, attention_mask.repeat_interleave({r}, "
                f"dim=0) (prompt_lengths likewise), and sequences= to check the new tokens; or {beams}"
            )
        )
    raise RoutesValidationError(
        f"the capture's routers ran forwards of {seen} rows, but one generate() over {b} sequences of {p} prompt "
        f"positions runs one prompt forward of {b * p} rows, then forwards of {b} rows (one new token per "
        f"sequence); split in that order these rows would give tokens other tokens' experts. Was it {hint}?"
    )


def _padded_prompt(routes: Routes) -> Routes:
    """The capture of a model that took the padding out of its prompt forward (one row per token its attention mask
    kept, ``Routes._prompt_kept`` the mask of those tokens), as that of a model that did not: a ``-1`` row at each
    padding position of the prompt, the mask recorded as the prompt forward's, so that the prompt rows are laid out
    over the prompts' grid, checked against the mask given (:func:`_check_prompt_mask`) as any capture's. Other
    routes as they are (a capture that did not record that mask is refused by :func:`_check_unpadded`)."""
    kept, calls = routes._prompt_kept, routes._call_rows
    if kept is None or not calls or calls[0][0] != int(kept.sum()) or kept.all():
        return routes
    first, total = calls[0][0], routes.tokens_per_layer[0] if routes.tokens_per_layer else 0
    index = torch.full((kept.numel() + total - first,), -1, dtype=torch.long)
    index[: kept.numel()][kept.reshape(-1)] = torch.arange(first)
    index[kept.numel() :] = torch.arange(first, total)
    out = take_rows(routes, index)
    out._call_rows = _runs([kept.numel(), *[n for n, c in calls for _ in range(c)][1:]])
    out._rows_moved, out._caches_interleaved = routes._rows_moved, routes._caches_interleaved
    mask = out._fed_mask if out._fed_mask is not None else torch.full((index.numel(),), -1, dtype=torch.int8)
    mask[: kept.numel()] = kept.reshape(-1).to(torch.int8)  # (0 at padding: the mask its prompt forward was fed)
    out._fed_mask = mask
    return out


def _check_whole_prompt_forward(routes: Routes) -> None:
    """Refuse a slice ``routes[a:b]`` that holds part of its capture's prompt forward, not all of it, as such: its
    first rows, as many as the prompt tokens the mask keeps, read as the capture of a model that takes the padding
    out before its routers."""
    if routes._cut_from is None:
        return
    whole, start, end = routes._cut_from
    first = whole.call_rows[0][0] if whole.call_rows else 0
    if start < first and (start > 0 or end < first):
        raise RoutesValidationError(
            f"these routes are rows {start}..{end - 1} of a capture whose first forward (generate()'s prompt forward) "
            f"routed rows 0..{first - 1}: the slice cuts that forward, so it holds part of the prompts' rows, and no "
            "split gives each sequence its own. Split the whole capture, then pick the sequences it gives (or slice "
            f"at a forward's edge: routes[:{first}] is the prompt forward)"
        )


def _check_unpadded(routes: Routes, prompt_mask: torch.Tensor) -> None:
    """Refuse the capture of a model that takes the padding out of its prompts before its routers: its prompt forward
    routed one row per prompt token the mask keeps, not one per prompt position, and a split that lays every prompt
    over its padded width would give tokens other tokens' rows (the model's own capture knows the rows of each
    forward: routes that do not are split by the row count alone)."""
    b, p = prompt_mask.shape
    kept, calls = int(prompt_mask.sum()), routes._call_rows
    if not calls or kept == b * p or calls[0] != (kept, 1):
        return
    _check_whole_prompt_forward(routes)  # (a slice that cuts the prompt forward to as many rows: said as such)
    raise RoutesValidationError(
        f"the capture's prompt forward routed {kept} rows, as many as the prompt tokens the mask keeps, not one per "
        f"position of its {b} prompts of {p} ({b * p}): the model takes the padding out before its routers, and "
        "split_generation, which lays each prompt over its padded width, would give tokens other tokens' experts. "
        "Replay such a capture in forwards like the captured ones (the prompts, then one new token per sequence at "
        "each step), or split its rows on your own: the prompt rows sequence by sequence, each its kept tokens"
    )


def _width_hint(
    calls: tuple[tuple[int, int], ...] | None,
    b: int,
    p: int,
    attention_mask: object,
    sequences: torch.Tensor | None,
) -> str:
    """What to pass where the row count does not fit ``b`` and ``p``, read from the capture's first forward if known."""
    generic = "Check batch_size and prompt_len, and that the capture holds exactly one generate() call"
    if not calls or b < 1 or calls[0][0] % b:
        return generic
    u = calls[0][0] // b
    if u == p:
        return generic
    said = (
        f"The capture's first forward (generate()'s prompt forward) routed {calls[0][0]} rows, {u} per sequence, "
        f"not {p}"
    )
    width = int(as_tensor(attention_mask).shape[1]) if attention_mask is not None else None
    if width is not None and sequences is not None and width == int(sequences.shape[1]) and u < p:
        return (
            f"{said}: the attention_mask given covers generate()'s whole output ({width} columns); pass the prompt "
            f"mask generate() was given, attention_mask[:, :{u}]"
        )
    if u < p:
        return (
            f"{said}. Were the prompts {u} wide (pass prompt_len={u}, or their own [{b}, {u}] mask)? Or was it a "
            "generate() continued from an earlier call's past_key_values, which routes only the prompt tokens its "
            f"cache did not hold? Split that as a generate() over those: prompt_len={u} and no attention_mask "
            f"(and, to check the tokens, sequences[:, {p - u}:] if the prompt was {p} wide: the uncached tokens and "
            "the new ones)"
        )
    return f"{said}: pass prompt_len={u}, the prompt width generate() ran with"


def _check_moves(routes: Routes) -> None:
    """Refuse a capture during which the KV cache moved rows between forwards (beam or contrastive search), or lost
    tokens its forwards had put in before later forwards (a decode loop that rolls back)."""
    moved = routes._rows_moved
    if moved is None:
        return
    if (
        moved.startswith("copy.deepcopy(")
        or moved.endswith(HELD_FEWER)
        or moved.split(" ")[0].endswith(tuple(f".{name}" for name in SHRINKS))
    ):
        raise RoutesValidationError(
            f"while this capture ran, tokens that its forwards had put in the KV cache were taken out of it ({moved}),"
            " and later forwards went on from the shorter cache: a decode loop that rolls back, as speculative "
            "decoding of one's own does to drop its rejected draft tokens (cache.crop, each layer cropped, or going "
            "back to a copy of the cache taken before them), or a cache emptied (reset()) and used again. The rows of"
            " the tokens taken out stay in the capture, in order among the rows of the tokens kept, so a split by "
            "their order would give later tokens the experts of dropped ones, and sequences= cannot tell them apart "
            "where tokens repeat. Capture a decode loop that does not roll back its cache (generate() sampling or "
            "greedy, or drafts verified before they are fed), each loop in its own capture() block; or pick the rows "
            "of the tokens kept yourself (your loop knows them: routes[index]) and replay those"
        )
    why = (
        "as a beam search (num_beams > 1, or one of one's own) does between steps to reorder its hypotheses"
        if moved.endswith("reorder_cache") or moved == PLAIN_REORDERED
        else "as a contrastive search (penalty_alpha) does to keep each sequence's chosen candidate"
    )
    raise RoutesValidationError(
        f"while this capture ran, the KV cache given to the model moved rows between forwards ({moved}, {why}), "
        "so row j of a decode step does not continue row j of the forward before it: no split of the rows by their "
        "order gives each sequence the routes of its own tokens, not even where every row was fed the tokens of "
        "one returned sequence (hypotheses that share a token swap rows unseen). Capture a rollout decoded with "
        "num_beams=1 (greedy or sampling)"
    )


def _fed_its_last(routes: Routes, sequences: torch.Tensor, b: int) -> bool:
    """Was the capture's last forward fed the last token of every sequence (where its ids were recorded)?

    A decode loop that feeds its last sampled token too (for its value, say) runs one step
    more than ``generate()``: its ``B * (P + N)`` rows hold a route for every token.
    """
    fed = routes._token_ids
    if fed is None or fed.numel() < b:
        return False
    got = fed[-b:]
    return bool((got >= 0).all()) and torch.equal(got, sequences[:, -1].detach().to("cpu", torch.long))


def _check_one_loop(routes: Routes) -> None:
    """Refuse a capture whose forwards were given KV caches in turn: the forwards of two decode loops interleaved."""
    kind = routes._caches_interleaved
    if kind is None:
        return
    if kind == "no cache" or kind.startswith(("new ", "switched ")):
        if kind.startswith("switched "):
            given = f"a new {kind[9:]} (a copy of a shared prompt's cache, say)"
        else:
            given = "no KV cache" if kind == "no cache" else f"a new {kind[4:]} that held no tokens"
        raise RoutesValidationError(
            f"while this capture ran, a forward of the model was given {given} after earlier forwards were given "
            "a KV cache: a decode loop began again (a second generate() call in the capture() block, or a loop of "
            "one's own started over), so its tokens do not continue the sequences of the forwards before it. Where "
            "its prompts are one token wide its forwards have the row counts of more decode steps of the first, and "
            "a split by their order would give tokens other tokens' experts. Capture each generate() call in its "
            "own capture() block (or continue a generation by passing its cache, past_key_values=out.past_key_values)"
        )
    raise RoutesValidationError(
        f"while this capture ran, the model's forwards were given KV caches in turn (a {kind} given again after "
        "another cache was given in between): the forwards of two decode loops interleaved, as generate(guidance_scale="
        "...) runs them (classifier-free guidance runs the model on the unconditional prompt after every step, with "
        "a cache of its own), or two generate() calls in turn. Their row counts fit one generate() of more new "
        "tokens, but no split of the rows by their order gives each token its own routes. Capture a rollout "
        "generated without guidance_scale, each generate() call in its own capture() block"
    )


def _check_prompt_mask(
    routes: Routes,
    prompt_mask: torch.Tensor,
    attention_mask: object,
    prompt_lengths: Sequence[int] | torch.Tensor | None,
    padding_side: str,
) -> None:
    """Refuse a prompt mask other than the one ``generate()``'s prompt forward ran with, where it was recorded.

    A mask of padding on the wrong side, of another batch, or none for a padded batch would
    give prompt tokens the rows of padding, and drop rows of real tokens.
    """
    fed = routes._fed_mask
    b, p = prompt_mask.shape
    if fed is None or b * p == 0:
        return
    ran = fed[: b * p].view(b, p)
    known = ran >= 0
    differ = known & (ran.bool() != prompt_mask)
    if not bool(differ.any()):
        return
    i, j = (int(v) for v in differ.nonzero()[0])
    if attention_mask is not None:
        given = "attention_mask"
        hint = (
            "pass the attention_mask generate() was given (with num_return_sequences=n, "
            "attention_mask.repeat_interleave(n, dim=0): each prompt repeated in place)"
        )
    elif prompt_lengths is not None:
        given = f"prompt_lengths with padding_side={padding_side!r}"
        side = "right" if padding_side == "left" else "left"
        other = _prompt_mask(b, p, None, prompt_lengths, side)
        fits = not bool((known & (ran.bool() != other)).any())
        hint = (
            f"the prompts were padded on the {side}: pass padding_side={side!r}"
            if fits
            else "pass the attention_mask generate() was given"
        )
    else:
        given = "none given: every prompt position a token"
        hint = (
            "generate() ran with padding: pass the attention_mask it was given. Given none, transformers' "
            "generate() makes one that marks every pad_token_id in the prompts as padding, a real token of that "
            "id too: pass input_ids.ne(pad_token_id), or generate with an explicit attention_mask"
        )
    say = {True: "a token", False: "padding"}
    raise RoutesValidationError(
        f"the prompt mask ({given}) is not the attention mask generate()'s prompt forward ran with: "
        f"{int(differ.sum())} of the {b}x{p} prompt positions differ (first: sequence {i}, position {j} is "
        f"{say[bool(prompt_mask[i, j])]} here but was {say[bool(ran[i, j])]} there), so the split would give prompt "
        f"tokens the rows of padding and drop rows of real tokens: {hint}"
    )


def _check_tokens(routes: Routes, sequences: torch.Tensor, grid: torch.Tensor, keep: torch.Tensor, p: int) -> None:
    """Refuse ``sequences`` whose tokens are not those the rows given to them were fed, where those were recorded."""
    fed = routes._token_ids
    if fed is None:
        return
    routed = keep & (grid >= 0)
    where = routed.nonzero()  # (sequence, position) of each row given, in the order of got and want
    got = fed[grid[routed]]
    want = sequences.detach().to("cpu", torch.long)[routed]
    bad = (got >= 0) & (got != want)
    if not bool(bad.any()):
        return
    prompt = bad & (where[:, 1] < p)
    k = int((prompt if bool(prompt.any()) else bad).nonzero()[0])
    i, j = (int(v) for v in where[k])
    if bool(prompt.any()):
        raise RoutesValidationError(
            f"sequences do not hold the prompts this capture's prompt forward was fed: {int(prompt.sum())} prompt "
            f"tokens differ (first: sequence {i}, position {j} holds {int(want[k])}, but its row was fed "
            f"{int(got[k])}). Are they the sequences of another generate() call, or in another order than generate() "
            "returned them (sorted, shuffled, grouped)? Pass the very sequences this generate() returned, in its order"
        )
    raise RoutesValidationError(
        f"the new tokens in sequences are not the tokens this capture's decode steps were fed: {int(bad.sum())} "
        f"differ (first: sequence {i}, new token {j - p} is {int(want[k])}, but row {i} of decode step {j - p + 1} "
        f"was fed {int(got[k])}), so the split would give them the routes of other tokens. Are they the sequences of "
        "another generate() call over the same prompts? Or did the decode loop reorder its sequences between steps, "
        "as a beam search (num_beams > 1) does (with num_return_sequences=num_beams it has the row counts of "
        "sampling)? Capture a rollout decoded with num_beams=1 (greedy or sampling), and pass the very sequences "
        "that generate() returned"
    )


def split_generation(
    routes: Routes,
    *,
    batch_size: int | None = None,
    prompt_len: int | None = None,
    attention_mask: torch.Tensor | None = None,
    prompt_lengths: Sequence[int] | torch.Tensor | None = None,
    padding_side: str = "left",
    sequences: torch.Tensor | None = None,
    new_tokens: int | None = None,
    lengths: Sequence[int] | torch.Tensor | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    keep_padding: bool = False,
    progress: bool | None = None,
) -> list[Routes]:
    """Split a capture taken around one batched ``generate()`` into per-sequence routes.

    Each sequence's routes are aligned to its token positions: its real prompt tokens,
    then its generated tokens. The last one has a -1 row (never routed, see the module
    docstring). The capture must hold one ``generate()`` call whose prompts ran in one
    forward. The routes that :meth:`~moe_replay.Session.routes` returns remember the rows
    of each forward, and other forwards are refused even where the row count fits: a
    chunked prefill (``generate(prefill_chunk_size=...)``, every sequence's chunk in turn),
    two ``generate()`` calls whose outputs were joined, ``use_cache=False``. They keep what
    they know through :meth:`~moe_replay.Routes.save` and :meth:`~moe_replay.Routes.load`,
    ``select``, ``rename``, ``with_token_ids``, :meth:`~moe_replay.Routes.cat` and slices of
    consecutive rows (``routes[a:b]``, each forward cut to the rows it holds); rows picked
    out of order (a list, a mask, a step) are refused. Routes joined with routes of unknown
    forwards, or captured in compiled code or a CUDA graph, no longer know their forwards
    and are split by the row count alone.

    Nor may the capture of a beam search (``num_beams > 1``) or of assisted decoding
    (``assistant_model``, ``prompt_lookup_num_tokens``): beam search reorders its hypotheses
    between steps, so a decode step's row ``j`` is not the token of returned sequence ``j``,
    and assisted decoding feeds several candidate tokens per step, rejected ones included.
    ``generate(num_beams=n, num_return_sequences=n)`` gives exactly the row counts of ``n``
    sampled sequences per prompt, so the row counts cannot tell it apart; what the forwards
    were fed can. The routes that :meth:`~moe_replay.Session.routes` returns also remember
    the token ids each forward was fed, the attention mask of its prompt forward, and
    whether the KV cache passed to the model moved rows between forwards
    (``reorder_cache``, or the model's own ``_reorder_cache``, as beam search does;
    ``batch_select_indices`` or ``batch_repeat_interleave``, as contrastive search does), or lost
    tokens its forwards had put in before later forwards (a speculative decode loop of one's own
    that rolls back rejected draft tokens: ``cache.crop(...)``, or a copy of the cache taken
    before them; a cache ``reset()`` and used again). A
    capture during which the cache moved rows or rolled back is refused, as is one whose forwards were given
    KV caches in turn (the
    forwards of two decode loops interleaved: ``generate(guidance_scale=...)`` runs the model
    on the unconditional prompt after every step, with a cache of its own, in forwards of the
    row counts of one ``generate()`` of more new tokens), one in which a forward was given a KV
    cache that held no tokens (or none), or a new one that held other tokens than the cache before
    it held (a copy of a shared prompt's cache), after earlier forwards were given one (a decode loop
    begun again: a second ``generate()`` call, whose forwards over prompts one token wide have
    the row counts of more decode steps), and a prompt mask other than the one
    ``generate()`` ran with; given ``sequences``, each token must be the one its row was fed
    (sequences of another call, or in another order, are refused). Sample or decode greedily when
    capturing a rollout, and pass ``sequences``: a decode loop of your own that moves rows
    through a cache without those methods shows only in the tokens.

    Args:
        routes: the capture (``session.routes()``), ``B * P + B * (N - 1)`` rows; or
            ``B * (P + N)`` from a decode loop that fed its last sampled token too, given
            ``sequences`` whose last tokens the capture's last forward was fed: every token,
            the last too, then has its route.
        batch_size: ``B``, the sequences generated; inferred from ``attention_mask``,
            ``prompt_lengths`` or ``sequences``, which must all agree on it.
        prompt_len: padded prompt width ``P``; inferred from a ``[B, P]`` ``attention_mask``.
        attention_mask: the prompt mask given to ``generate()`` (1 = token, 0 = padding);
            a longer mask is cut to its first ``P`` columns. With
            ``num_return_sequences=n`` each prompt gives ``n`` sequences: pass
            ``attention_mask.repeat_interleave(n, dim=0)``. The row count alone cannot
            tell a mask of too few rows from more new tokens, so pass ``sequences`` too.
        prompt_lengths, padding_side: instead of a mask, real prompt lengths and the side
            the prompts were padded on.
        sequences: ``generate()``'s ``[B, P + N]`` output, to check ``N``, find
            end-of-sequence tokens and check every kept token against the token its row
            was fed (where the capture recorded it). From ``generate(inputs_embeds=...)``,
            which returns the ``N`` new tokens only, put the prompt ids before them.
        new_tokens: ``N``; inferred from the row count.
        lengths: new tokens per sequence (a sequence that stopped early has fewer);
            default: from ``sequences`` and ``eos_token_id``, else ``N`` each. Given with
            both, the three must agree.
        eos_token_id: end-of-sequence id(s) to find ``lengths`` in ``sequences``.
        keep_padding: keep every position of ``generate()``'s ``[B, P + N]`` grid, with -1
            rows at padding, so that ``Routes.cat(result)`` replays a forward over
            ``sequences`` itself. By default padding is dropped.
        progress: a bar over the sequences on stderr (``tqdm``'s where installed): ``None``
            shows it where stderr is a terminal (``MOE_REPLAY_PROGRESS=0`` or ``1`` decides
            instead where set), ``True`` always, ``False`` never. It changes nothing else.

    Returns:
        One :class:`~moe_replay.Routes` per sequence.

    Raises:
        RoutesValidationError: the row count does not fit ``B``, ``P`` and ``N``; the
            capture's forwards are not one prompt forward then one per new token; the KV
            cache moved rows between forwards (beam search) or rolled back (``crop``), the forwards were given KV
            caches in turn (``guidance_scale``) or a decode loop began again (a second
            ``generate()``); ``sequences`` hold other tokens than their rows were fed;
            or the prompt mask is not ``generate()``'s.
        InvalidArgumentError: the arguments disagree on ``B`` (a prompt mask not repeated
            for ``num_return_sequences``), or ``padding_side`` is neither "left" nor "right".

    Example:
        Replay a rollout in one teacher-forced forward over ``generate()``'s output:

        >>> import torch, moe_replay as mr
        >>> model = mr.models.build("softmax_topk")
        >>> prompt, mask = torch.randint(1, 128, (2, 4)), torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
        >>> with mr.attach(model) as session:
        ...     with session.capture():
        ...         seqs = model.generate(prompt, max_new_tokens=3, attention_mask=mask)
        ...     parts = mr.split_generation(session.routes(), attention_mask=mask, keep_padding=True)
        ...     full_mask = torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], dim=1)
        ...     with session.replay(mr.Routes.cat(parts)):
        ...         model(seqs, attention_mask=full_mask, labels=seqs).loss.backward()
        >>> [p.num_tokens for p in parts]  # the [2, 4 + 3] grid of generate()'s output
        [7, 7]
    """
    if not isinstance(routes, Routes):
        raise ArgumentTypeError(f"split_generation takes Routes, got {type(routes).__name__}")
    keep_padding = check_flag(keep_padding, "split_generation: keep_padding")
    progress = check(progress, "split_generation")
    if not is_one_of(padding_side, ("left", "right")):  # (checked whatever else is given: a typo is never ignored)
        raise InvalidArgumentError(f"padding_side must be 'left' or 'right', got {padding_side!r:.60}")
    if sequences is not None and (not isinstance(sequences, torch.Tensor) or sequences.dim() != 2):
        output = isinstance(getattr(sequences, "sequences", None), torch.Tensor)
        raise InvalidArgumentError(
            f"sequences must be the [batch, prompt_len + new] tensor generate() returns, got "
            f"{tuple(sequences.shape) if isinstance(sequences, torch.Tensor) else type(sequences).__name__}"
            + (
                ": generate(return_dict_in_generate=True) returns an output object; pass its .sequences"
                if output
                else ""
            )
        )
    if sequences is not None:
        _check_token_ids(sequences)
    tokens = set(routes.tokens_per_layer)
    if len(tokens) != 1:
        raise RoutesValidationError(
            f"routers recorded different row counts {sorted(tokens)}: a generate() capture gives every router "
            "the same rows; was the capture cut, or did some routers not run?"
        )
    total = tokens.pop()
    if routes._dropped_rows > 0:
        raise RoutesValidationError(
            f"this capture kept only its newest {total} rows per router: keep_newest=True dropped the oldest "
            f"{routes._dropped_rows} rows, so the rows no longer start at generate()'s prompt forward and would "
            "give tokens other tokens' experts. Capture without keep_newest: an eager capture grows to hold every row"
        )
    # (rows of routers that saw a forward's tokens sequence-first: each forward's rows sequence by sequence first)
    routes = in_token_order(routes, "split_generation")
    routes = _padded_prompt(routes)
    total = routes.tokens_per_layer[0]  # (with a row at each padding position of a prompt whose padding was taken out)

    if routes._rows_picked is not None:
        raise RoutesValidationError(
            f"these routes are rows picked out of a capture's order ({routes._rows_picked}): they no longer follow "
            "its forwards, so no split by their order gives each sequence the routes of its own tokens. Split the "
            "whole capture (or a slice routes[a:b] of consecutive rows), then pick from the sequences it gives"
        )

    batch_size = _batch_size(batch_size, attention_mask, prompt_lengths, sequences)
    if prompt_len is None:
        if attention_mask is None:
            raise InvalidArgumentError(
                "give prompt_len, the padded prompt width (or a [batch, prompt_len] attention_mask)"
            )
        prompt_len = int(as_tensor(attention_mask).shape[1])
    b, p = batch_size, check_count(prompt_len, "prompt_len")
    if attention_mask is not None or prompt_lengths is not None:
        _check_unpadded(routes, _prompt_mask(b, p, attention_mask, prompt_lengths, padding_side))

    decode = total - b * p
    if decode < 0 or decode % b:
        raise RoutesValidationError(
            f"the capture holds {total} rows per router; a generate() over {b} prompts of {p} positions "
            f"gives {b}*{p} prompt rows plus {b} rows per decode step. "
            + _width_hint(routes._call_rows, b, p, attention_mask, sequences)
        )
    n = decode // b + 1
    _check_forwards(routes._call_rows, b, p, n, returned=sequences is not None)
    _check_moves(routes)
    _check_one_loop(routes)
    fed_last = False  # a decode loop that fed its last sampled token too: every token has its row
    if sequences is not None:
        seq_n = int(sequences.shape[1]) - p
        if seq_n < 0:  # (not even the prompt: no count of new tokens to compare)
            raise RoutesValidationError(
                f"sequences hold {int(sequences.shape[1])} positions, fewer than the prompt's {p}: generate() returns "
                f"the prompt and the new tokens, [{b}, {p} + new]; pass its output whole (sequences=output, or "
                "output.sequences)"
            )
        if seq_n == n - 1 and seq_n >= 1 and _fed_its_last(routes, sequences, b):
            n, fed_last = seq_n, True
        elif seq_n != n:
            cause = (
                f"was it generate(inputs_embeds=...), which returns only the new tokens, not the prompt? Pass "
                f"sequences=torch.cat([prompt_ids, output], dim=1), the [{b}, {p} + {n}] sequences"
                if int(sequences.shape[1]) == n
                else "was more than one generate() captured, or a beam search or assisted decoding (not supported: "
                "see split_generation's docstring)?"
            )
            raise RoutesValidationError(
                f"sequences hold {seq_n} new tokens, but the capture holds {decode // b} decode steps "
                f"(= {n} new tokens): {cause}"
            )
    steps = n if fed_last else n - 1  # decode steps (each of b rows) given to the new tokens
    if new_tokens is not None and check_count(new_tokens, "new_tokens") != n:
        fed = "its last token fed back too" if fed_last else "the last token is never fed back"
        raise RoutesValidationError(
            f"new_tokens={int(new_tokens)}, but the capture holds {steps} decode steps (= {n} new tokens: {fed}); "
            f"pass new_tokens={n}, the new tokens generate() added per sequence, or leave it out (read from the rows)"
        )

    prompt_mask = _prompt_mask(b, p, attention_mask, prompt_lengths, padding_side)
    _check_prompt_mask(routes, prompt_mask, attention_mask, prompt_lengths, padding_side)
    if eos_token_id is not None and sequences is None:  # (with lengths= too: never ignored)
        raise InvalidArgumentError("eos_token_id needs sequences to find where each sequence stopped")
    if lengths is None:
        gen = generation_lengths(sequences, p, eos_token_id).cpu() if sequences is not None else torch.full((b,), n)
    else:
        gen = _integers(lengths, "lengths (new tokens per sequence)").cpu()
        if gen.numel() != b or bool((gen < 1).any()) or bool((gen > n).any()):
            raise InvalidArgumentError(f"lengths must be {b} values in 1..{n}, got {gen.tolist()}")
        if eos_token_id is not None and sequences is not None:  # (both say where each sequence stopped: never one
            found = generation_lengths(sequences, p, eos_token_id).cpu()  # of them ignored where they disagree)
            if not torch.equal(found, gen):
                raise InvalidArgumentError(
                    f"lengths={gen.tolist()} but eos_token_id={eos_token_id!r:.40} ends the sequences after "
                    f"{found.tolist()} new tokens: both say where each sequence stopped, and they disagree. Give "
                    "one of them"
                )

    # capture row of every (sequence, grid position); -1 where nothing was routed
    grid = torch.full((b, p + n), -1, dtype=torch.long)
    grid[:, :p] = torch.arange(b * p).view(b, p)
    step = torch.arange(steps)
    grid[:, p : p + steps] = b * p + step[None, :] * b + torch.arange(b)[:, None]
    keep = torch.zeros(b, p + n, dtype=torch.bool)
    keep[:, :p] = prompt_mask
    keep[:, p:] = torch.arange(n)[None, :] < gen[:, None]
    if not fed_last:
        last = p + gen - 1
        grid[torch.arange(b), last] = -1  # the last token of each sequence was never routed (or is EOS fed as input)
    grid[~keep] = -1
    if sequences is not None:
        _check_tokens(routes, sequences, grid, keep, p)

    ids = None
    if sequences is not None:  # every kept position's token: the rows' own where recorded (checked above), else read
        seq = sequences.detach().to("cpu", torch.long)
        ids = torch.where(keep & (seq >= 0), seq, -1)
    parts = []
    with Progress(b, "moe_replay: splitting sequences", enabled=progress) as bar:
        for i in range(b):
            part = take_rows(routes, grid[i])
            if ids is not None:
                part._token_ids = _known_or_none(ids[i].clone())
            parts.append(part if keep_padding else part[keep[i]])
            bar.update()
    return parts
