"""The batched model calls of a sweep: binary-choice scores of every (arm, item) row in one
forward pass, and greedy generations of every (arm, prompt) row in one ``generate`` with their
NLL under the unsteered model. An *arm* is a ``(slot, coeff)`` pair: the row is steered with
``vectors[slot]`` times ``coeff`` (slot -1: unsteered).

**One batch per sweep.** Sweeping P prompts over C coefficients is one batch of ``C * P`` rows:
row ``(j, p)`` is prompt ``p`` with its own coefficient ``c_j`` (and, in ``steerkern.compare``,
its own vector slot), through ``steer(model, vectors, slots=..., coeff=...)``. A batch too big for
memory (a whole model-written-evals file; ``steerkern.memory``), or on CPU a scoring batch
past about ``CPU_PASS_TOKENS`` padded tokens, runs in passes of whole prompts (every arm of
each) of similar lengths, each padded to its own longest prompt (``steerkern.passes``);
``batch_size`` caps the rows per pass by hand.

**Shared prefill.** The rows of a sweep repeat work: every chat-rendered prompt starts with
the same template tokens, and when only generated tokens (or, when scoring, only the answer
position) are steered, a prompt's tokens are the same under every coefficient. With
``share_prefill=True`` (the default) that work runs once and its KV cache is copied to the
rows (``steerkern.prefill``): for ``C`` coefficients, ``P`` prompts of ``T`` tokens sharing
a ``k``-token prefix, a batch costs about ``C k + C P (T - k)`` prompt-token rows with the
prompt steered ("all"/"prompt") and ``k + P (T - 1 - k) + C P`` without ("generated"),
instead of ``C P T``. The unsteered NLL pass shares the same way. Results are those of the
plain batch up to float rounding.

**Score** of a row: the formula of :mod:`steerkern.items` at the answer position (the last
prompt token's next-token log-probabilities).

**NLL** of a generation: the mean negative log-likelihood per generated token under the
unsteered model, up to and including the first end-of-sequence token. The forward stops at the
output head and the log-probs are read from the final hidden states (:mod:`steerkern.head`),
without the ``[rows, tokens, vocab]`` logits (full logits only for models that soft-cap them).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect

import numpy as np
import torch

from steerkern.head import IGNORE, FinalHidden, HeadLogits, output_head
from steerkern.items import BinaryItem, render
from steerkern.kvcache import (
    cache_argument,
    empty_model_cache,
    is_gatherable,
    positions_from_mask,
    reserve_columns,
    select_rows,
)
from steerkern.memory import rows_that_fit
from steerkern.models import input_device
from steerkern.passes import Pass, plan_passes
from steerkern.prefill import SharedPrompt, forward_rest, shared_prefill
from steerkern.tokens import check_fits_positions, short_repr, text_token_ids
from steerkern.trunk import lowest_steered_layer


def _pad_id(tokenizer) -> int:
    """The id that pads rows: the tokenizer's pad token, else its EOS token (as
    ``steerkern.capture`` pads), else 0. Padded positions are masked out of attention and out
    of every score and NLL, so any id works; a tokenizer without a pad token (GPT-2's) needs
    no preparation."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def _encode(tokenizer, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` ``[len(texts), T]`` on ``device``, each
    text's ids as extraction reads them (:func:`steerkern.tokens.text_token_ids`).

    Padded here rather than by the tokenizer, so that neither its pad token nor its
    ``padding_side`` matters and the tokenizer is never modified."""
    encoded = text_token_ids(tokenizer, texts)
    for text, seq in zip(texts, encoded):
        if not seq:
            raise ValueError(f"the tokenizer turns {text!r} into no tokens: give a prompt with some text")
    width = max(len(seq) for seq in encoded)
    ids = torch.full((len(encoded), width), _pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, seq in enumerate(encoded):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


def _forward_logits(model, ids, mask, keep: int) -> torch.Tensor:
    """Logits of the last ``keep`` positions ``[B, keep, V]``, without computing the others
    when the model supports ``logits_to_keep``."""
    kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=False)
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = keep
    return model(**kwargs).logits[:, -keep:]


def _steering(model, vectors, slots: list[int], coeffs: list[float], positions):
    """``steer`` for one micro-batch; no hooks at all when every row is unsteered."""
    if all(s < 0 for s in slots):
        return contextlib.nullcontext()
    from steerkern.control import steer

    return steer(model, vectors, coeff=torch.tensor(coeffs, dtype=torch.float32),
                 slots=torch.tensor(slots, dtype=torch.int64), positions=positions)


def _share(model, tokenizer, vectors, ids, mask, prompt_index, slots: list[int],
           coeffs: list[float], positions: str, extra_columns: int = 0) -> SharedPrompt | None:
    """Shared prefill of one micro-batch (``steerkern.prefill.shared_prefill``), or ``None``.

    The prompt tokens are steered when ``positions`` is "all" or "prompt" and some row has a
    slot ``>= 0``: rows with the same ``(slot, coeff)`` then share the template prefix, and the
    decoder layers below the lowest steered one run each prompt's suffix once for all its rows
    (:mod:`steerkern.trunk`). Otherwise the whole prompt but its last token is unsteered and
    shared per prompt."""
    steered = [s >= 0 for s in slots]
    groups = None
    if positions in ("all", "prompt") and any(steered):
        groups = [(s, float(c)) if s >= 0 else None for s, c in zip(slots, coeffs)]

    def steer_prefix(rows: list[int]):
        return _steering(model, vectors, [slots[r] for r in rows], [coeffs[r] for r in rows], "all")

    return shared_prefill(model, ids, mask, prompt_index, pad_id=_pad_id(tokenizer),
                          groups=groups, steer_prefix=steer_prefix, extra_columns=extra_columns,
                          steer_rows=lambda: steer_prefix(list(range(len(slots)))),
                          unsteered_layers=lowest_steered_layer(vectors, slots))


# Padded prompt tokens per scoring pass on CPU when ``batch_size`` is not given: bigger passes
# run the same FLOPs slower there (research_notes.md, 2026-12-01 session 12).
CPU_PASS_TOKENS = 4096


def _plan(model, lengths: list[int], arms: int, batch_size: int | None, *, extra: int = 0,
          keep: int = 1, token_budget: bool = False) -> list[Pass]:
    """The passes of ``len(lengths)`` prompts x ``arms`` arms (:mod:`steerkern.passes`): at most
    ``batch_size`` rows each, or with ``None`` as many as fit memory (rows of the longest prompt
    plus ``extra`` tokens, reading ``keep`` positions' logits: ``steerkern.memory``), and with
    ``token_budget`` on CPU about ``CPU_PASS_TOKENS`` padded prompt tokens."""
    if batch_size:
        return plan_passes(lengths, arms, max_rows=batch_size)
    max_rows = rows_that_fit(model, max(lengths, default=1) + extra, keep)
    on_cpu = token_budget and input_device(model).type == "cpu"
    return plan_passes(lengths, arms, max_rows=max_rows, max_tokens=CPU_PASS_TOKENS if on_cpu else None)


def _pass_prompts(ids, mask, part: Pass) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids, mask, prompt_index)`` of one pass: its prompts ``[P', W]`` left-padded to their own
    longest (``W``), and ``[R]`` the index among them of each of the pass's rows."""
    pick = torch.tensor(part.prompts, device=ids.device)
    width = int(mask[pick].sum(-1).max())
    prompt_index = torch.arange(len(part.prompts), device=ids.device).repeat_interleave(len(part.arms))
    return ids[pick, -width:], mask[pick, -width:], prompt_index


def _bar(total: int, desc: str, enabled: bool, unit: str = "row"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False)


@torch.no_grad()
def score_rows(model, tokenizer, vectors, items: list[BinaryItem], arms, *, batch_size=None,
               positions="all", progress=False, share_prefill=True) -> np.ndarray:
    """Scores of every (arm, item) pair in one batched forward pass.

    Args:
        vectors: list of SteeringVector; an arm ``(slot, coeff)`` steers with ``vectors[slot]``
            (``slot = -1``: unsteered).
        items: ``[P]`` prepared questions.
        arms: ``[A]`` ``(slot, coeff)`` pairs.
        positions: "all"/"prompt" steer every prompt token; "generated" steers only the answer
            position (the first token the model would generate).
        share_prefill: compute prompt work shared between rows once (``steerkern.prefill``):
            the chat template's common prefix once per arm and the decoder layers below the
            lowest steered one once per prompt, and under "generated" every prompt token but
            the answer position once per prompt. Same scores up to float
            rounding; ``False`` (or a model whose cache cannot be shared) runs every row's
            whole prompt.

    Returns:
        ``[A, P]`` float64 scores in nats (see the module docstring).
    """
    texts = [render(tokenizer, it.question, it.prefix) for it in items]
    ids, mask = _encode(tokenizer, texts, input_device(model))
    check_fits_positions(model, mask.sum(-1).tolist(), lambda i: f"prompts[{i}] {short_repr(items[i].question)}",
                         fix="shorten the question")
    count = len(items)
    scores = np.empty((len(arms), count), dtype=np.float64)
    with _bar(len(arms) * count, "scoring", progress) as bar:
        for part in _plan(model, mask.sum(-1).tolist(), len(arms), batch_size, token_budget=True):
            chunk = part.rows
            pids, pmask, prompt_index = _pass_prompts(ids, mask, part)
            slots, coeffs = [arms[a][0] for a, _ in chunk], [arms[a][1] for a, _ in chunk]
            shared = _share(model, tokenizer, vectors, pids, pmask, prompt_index, slots, coeffs,
                            positions) if share_prefill else None
            if shared is not None:
                # what is left to run: the suffixes (prompt steered, "all"/"prompt") or the
                # answer position alone ("generated"); both are steered wholly
                with _steering(model, vectors, slots, coeffs, "all"):
                    logits = forward_rest(model, shared, shared.ids, shared.mask, keep=1)[:, -1]
            else:
                cids, cmask = pids[prompt_index], pmask[prompt_index]
                where = positions
                if positions == "generated":
                    where = torch.zeros_like(cmask, dtype=torch.bool)
                    where[:, -1] = True
                elif positions == "prompt":
                    where = "all"
                with _steering(model, vectors, slots, coeffs, where):
                    logits = _forward_logits(model, cids, cmask, keep=1)[:, -1]
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()
            for row, (a, p) in enumerate(chunk):
                item = items[p]
                pos = torch.logsumexp(logp[row, list(item.positive)], dim=0)
                neg = torch.logsumexp(logp[row, list(item.negative)], dim=0)
                scores[a, p] = float(pos - neg)
            bar.update(len(chunk))
    return scores


class _StepBar:
    """A logits processor that only advances a progress bar once per generated token."""

    def __init__(self, bar):
        self.bar = bar

    def __call__(self, input_ids, scores):
        self.bar.update(1)
        return scores


def _eos_ids(model, tokenizer) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        eos.append(tokenizer.eos_token_id)
    return sorted(set(int(e) for e in eos))


def _greedy_config(model, tokenizer, max_new_tokens: int):
    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    config.do_sample = False
    config.num_beams = 1
    for name in ("temperature", "top_p", "top_k", "min_p", "typical_p"):
        if hasattr(config, name):
            setattr(config, name, None)
    # plain greedy text: a checkpoint's repetition penalty / banned n-grams would also read the
    # padding, which a shared prefill places between a prompt's prefix and its rest
    fresh = GenerationConfig()
    for name in ("repetition_penalty", "no_repeat_ngram_size"):
        if hasattr(config, name):
            setattr(config, name, getattr(fresh, name, None))
    config.max_new_tokens = max_new_tokens
    config.min_new_tokens = None
    if config.min_length:  # a checkpoint's min_length would hold rows past their EOS
        config.min_length = 0
    config.max_length = None
    config.pad_token_id = _pad_id(tokenizer)
    return config


@torch.no_grad()
def sweep_generate(model, tokenizer, vectors, ids, mask, prompt_index, slots: list[int],
                   coeffs: list[float], *, config, positions="all", share_prefill=True,
                   logits_processor=None) -> torch.Tensor:
    """One batched ``generate`` of ``R`` rows, row ``r`` being prompt ``prompt_index[r]``
    steered with ``vectors[slots[r]]`` times ``coeffs[r]`` (slot -1: unsteered).

    Args:
        ids, mask: ``[P, T]`` left-padded prompts (``_encode``).
        prompt_index: ``[R]`` int64 prompt of each row; slots, coeffs: ``[R]``.
        config: the ``GenerationConfig`` (``_greedy_config``).
        positions: "all", "prompt" or "generated", as in ``steer``.
        share_prefill: prefill prompt work shared between rows once (``steerkern.prefill``):
            the template prefix once per (slot, coeff) when prompts are steered (and the
            decoder layers below the lowest steered one once per prompt, the prefix once),
            the whole prompt but its last token once per prompt under "generated"; the first
            generate step then runs only the remaining prompt columns of all ``R`` rows. Falls
            back to the plain batch when nothing is shared or the model's cache cannot be
            shared.

    Returns:
        ``[R, N]`` the generated token ids (``N <= config.max_new_tokens``; rows finished
        early are padded as ``generate`` pads them).
    """
    greedy = not config.do_sample and (config.num_beams or 1) == 1
    if max(config.num_beams or 1, config.num_return_sequences or 1) > 1:
        share_prefill = False  # generate expands the rows it is given, not a cache passed in
    if (config.repetition_penalty or 1.0) != 1.0 or (config.no_repeat_ngram_size or 0) > 0:
        share_prefill = False  # they read the prompt's tokens, padding between its pieces included
    if share_prefill and positions == "generated" and greedy:
        new = _sweep_sharing_first_token(model, tokenizer, vectors, ids, mask, prompt_index, slots,
                                         coeffs, config, logits_processor)
        if new is not None:
            return new
    shared = _share(model, tokenizer, vectors, ids, mask, prompt_index, slots, coeffs,
                    positions, config.max_new_tokens) if share_prefill else None
    if shared is None:
        inputs = dict(input_ids=ids[prompt_index], attention_mask=mask[prompt_index])
        where, prompt_len = positions, ids.shape[1]
    else:
        prompt_len = shared.ids.shape[1]
        inputs = {"input_ids": shared.ids, "attention_mask": shared.mask,
                  shared.cache_arg: reserve_columns(shared.cache, prompt_len + config.max_new_tokens)}
        where = positions
        if positions == "prompt":  # every prompt column of the new layout; pads stay unsteered
            where = torch.ones_like(shared.mask, dtype=torch.bool)
        elif positions == "generated":
            # generate's first pass starts at column `shared.cached`, not 0, so the steering
            # bank cannot tell prompt from generated by the first pass: mark them by column
            where = torch.zeros(shared.ids.shape[0], prompt_len + config.max_new_tokens,
                                dtype=torch.bool, device=shared.ids.device)
            where[:, prompt_len:] = True
        config = _for_a_given_cache(config)
    with _steering(model, vectors, slots, coeffs, where):
        out = _generate(model, **inputs, generation_config=config, logits_processor=logits_processor)
    return out[:, prompt_len:]


def _generate(model, **kwargs):
    """``model.generate(**kwargs)`` that leaves the model's generation state as it found it.

    Qwen2.5-VL / Qwen3-VL keep their last ``generate``'s multimodal position offsets
    (``rope_deltas``, ``[rows, 1]``) and reuse them when handed a non-empty cache, which a sweep
    builds for another number of rows: cleared for the call (text-only rows recompute them) and
    put back after it, ``None`` included. transformers 4.50 keeps the cache object a ``generate``
    built (``model._cache``, Gemma 2's ``HybridCache``) for the next call: a sweep's, sized for
    its rows, is not left in its place."""
    holders = [m for m in model.modules() if hasattr(m, "rope_deltas")]
    kept = [m.rope_deltas for m in holders]
    kept_cache = model.__dict__.get("_cache", _ABSENT)
    for module in holders:
        module.rope_deltas = None
    try:
        return model.generate(**kwargs)
    finally:
        for module, value in zip(holders, kept):
            module.rope_deltas = value
        if kept_cache is _ABSENT:
            model.__dict__.pop("_cache", None)
        else:
            model.__dict__["_cache"] = kept_cache


_ABSENT = object()


def _for_a_given_cache(config):
    """``config`` for a ``generate`` call handed a cache: without ``cache_implementation``
    (a checkpoint's ``"static"``, say), which generate refuses next to a cache."""
    if getattr(config, "cache_implementation", None) is None:
        return config
    config = copy.deepcopy(config)
    config.cache_implementation = None
    return config


def _sweep_sharing_first_token(model, tokenizer, vectors, ids, mask, prompt_index, slots, coeffs,
                               config, logits_processor) -> torch.Tensor | None:
    """``sweep_generate`` for greedy decoding that steers only generated tokens: no prompt token
    is steered, so each distinct prompt's whole prefill and its first greedy token are the same
    for every row and run once (``P'`` rows, shared template prefix included); the ``R`` rows
    then decode from the gathered cache with the first token as their first steered input.
    Rows whose first token ends the sequence are not decoded further (``generate`` pads them).
    Returns ``None`` when the model's cache cannot be gathered by rows."""
    if empty_model_cache(model, ids.shape[1] + config.max_new_tokens) is None:
        return None
    used, row_prompt = torch.unique(prompt_index, return_inverse=True)
    shared = shared_prefill(model, ids, mask, used, pad_id=_pad_id(tokenizer),
                            extra_columns=config.max_new_tokens)
    if shared is None:
        width = int(mask[used].sum(-1).max())
        inputs = dict(input_ids=ids[used, -width:], attention_mask=mask[used, -width:])
    else:
        inputs = {"input_ids": shared.ids, "attention_mask": shared.mask, shared.cache_arg: shared.cache}
    first_config = copy.deepcopy(_for_a_given_cache(config) if shared is not None else config)
    first_config.max_new_tokens = 1
    first_config.return_dict_in_generate = True
    if config.min_new_tokens:
        first_config.min_new_tokens = 1
    first = _generate(model, **inputs, generation_config=first_config, logits_processor=logits_processor)
    cache = getattr(first, "cache", None)  # transformers 5; "past_key_values" before
    cache = getattr(first, "past_key_values", None) if cache is None else cache
    prompt_ids, prompt_mask = inputs["input_ids"], inputs["attention_mask"]
    width = prompt_ids.shape[1]
    if not is_gatherable(cache, width + config.max_new_tokens):
        return None
    token = first.sequences[:, width]  # [P'] the first greedy token of each prompt
    eos = config.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    new = torch.full((len(slots), config.max_new_tokens), pad, dtype=token.dtype, device=token.device)
    new[:, 0] = token[row_prompt]
    live = ~torch.isin(token[row_prompt], torch.tensor(eos, dtype=token.dtype, device=token.device))
    if config.max_new_tokens == 1 or not bool(live.any()):
        return new[:, :1]
    rows = row_prompt[live]
    reserve_columns(select_rows(cache, rows), width + config.max_new_tokens)
    rest_ids = torch.cat([prompt_ids[rows], token[rows, None]], dim=1)
    rest_mask = torch.cat([prompt_mask[rows], torch.ones_like(prompt_mask[rows, :1])], dim=1)
    rest_config = copy.deepcopy(_for_a_given_cache(config))
    rest_config.max_new_tokens = config.max_new_tokens - 1
    if config.min_new_tokens:
        rest_config.min_new_tokens = config.min_new_tokens - 1
    # generate's first pass starts at the first token's column: mark steered columns absolutely
    where = torch.zeros(len(rows), width + config.max_new_tokens, dtype=torch.bool, device=rows.device)
    where[:, width:] = True
    live_list = live.tolist()
    keep = lambda values: [v for v, alive in zip(values, live_list) if alive]
    with _steering(model, vectors, keep(slots), keep(coeffs), where):
        out = _generate(model, input_ids=rest_ids, attention_mask=rest_mask,
                             generation_config=rest_config, logits_processor=logits_processor,
                             **{cache_argument(model): cache})
    rest = out[:, width + 1:]
    new[live, 1:1 + rest.shape[1]] = rest
    return new[:, :1 + rest.shape[1]]


def _fused_head(model, ids, mask) -> tuple[torch.nn.Module, HeadLogits] | None:
    """``(head, logits)`` for the NLL's fused log-probs (:mod:`steerkern.head`), the model's
    logit factor measured on the shortest of the ``[P, T]`` prompts; ``None`` when the model has
    no usable head or transforms its logits beyond a constant factor and its config's soft-cap:
    its NLL then reads full logits."""
    try:
        head = output_head(model, "the sweep's NLL")
        shortest = int(mask.sum(-1).argmin())
        width = int(mask[shortest].sum())
        one_ids, one_mask = ids[shortest:shortest + 1, -width:], mask[shortest:shortest + 1, -width:]
        return head, HeadLogits.measure(model, head, one_ids, one_mask, positions_from_mask(one_mask))
    except ValueError:
        return None


def _generated_logprobs(run, fused_head, new: torch.Tensor, gen_mask: torch.Tensor) -> torch.Tensor:
    """``[R, N]`` log-probs of the generated tokens ``new`` (0 where ``gen_mask`` is False) from
    ``run(keep=keep)``, the forward over prompt and generation that returns the logits of the last
    ``keep`` positions. With ``fused_head`` (:func:`_fused_head`) the forward stops at the
    head's input and the log-probs never build ``[R, N, V]`` logits
    (:func:`steerkern.head.head_logprobs`); else (or when the forward never calls the head)
    they are read from the logits."""
    keep = new.shape[1] + 1
    labels = new.masked_fill(~gen_mask, IGNORE)
    if fused_head is not None:
        head, head_logits = fused_head
        with FinalHidden(head) as final:
            logits = run(keep=keep)
        if final.h is not None:
            return head_logits.logprobs(final.h[:, -keep:], labels)
    else:
        logits = run(keep=keep)
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, new[..., None])[..., 0].masked_fill(~gen_mask, 0.0)


@torch.no_grad()
def generate_rows(model, tokenizer, vectors, prompts: list[str], arms, *, max_new_tokens=48,
                  batch_size=None, positions="all", progress=False, share_prefill=True):
    """Greedy generations of every (arm, prompt) pair in one batched ``generate``, then their
    per-token NLL under the unsteered model in one batched forward pass.

    With ``share_prefill`` (``steerkern.prefill``), prompt work shared between rows is done
    once and its KV cache copied to the rows: the chat template's common prefix once per arm
    when the prompt is steered ("all"/"prompt"), with the decoder layers below the lowest
    steered one run once per prompt (:mod:`steerkern.trunk`), and the whole prompt but its
    last token once per prompt when it is not ("generated", and always for the unsteered NLL
    pass).
    The same tokens and NLL as without it, up to float rounding (which can flip a greedy
    near-tie).

    Returns:
        ``(texts, nll)``: ``texts[a][g]`` the decoded generation; ``nll`` ``[A, G]`` float64
        mean negative log-likelihood per generated token (through the first EOS), in nats.
    """
    device = input_device(model)
    ids, mask = _encode(tokenizer, [render(tokenizer, p, answer=False) for p in prompts], device)
    check_fits_positions(model, mask.sum(-1).tolist(), lambda i: f"generation prompt {short_repr(prompts[i])}",
                         extra=max_new_tokens, fix="shorten the prompt or lower max_new_tokens")
    count = len(prompts)
    eos = torch.tensor(_eos_ids(model, tokenizer), device=device)
    config = _greedy_config(model, tokenizer, max_new_tokens)
    texts = [[""] * count for _ in arms]
    nll = np.empty((len(arms), count), dtype=np.float64)
    nll_head = _fused_head(model, ids, mask) if count and arms else None
    for part in _plan(model, mask.sum(-1).tolist(), len(arms), batch_size, extra=max_new_tokens,
                      keep=1 if nll_head is not None else max_new_tokens + 1):
        chunk = part.rows
        pids, pmask, index = _pass_prompts(ids, mask, part)
        slots, coeffs = [arms[a][0] for a, _ in chunk], [arms[a][1] for a, _ in chunk]
        cids, cmask = pids[index], pmask[index]
        with _bar(max_new_tokens, f"generating {len(chunk)} rows", progress, unit="tok") as bar:
            new = sweep_generate(model, tokenizer, vectors, pids, pmask, index, slots, coeffs,
                                 config=config, positions=positions, share_prefill=share_prefill,
                                 logits_processor=[_StepBar(bar)] if progress else None)
        is_eos = torch.isin(new, eos) if eos.numel() else torch.zeros_like(new, dtype=torch.bool)
        # keep tokens up to and including the first EOS
        gen_mask = (is_eos.long().cumsum(-1) - is_eos.long()) == 0
        unsteered = _share(model, tokenizer, vectors, pids, pmask, index, [-1] * len(chunk),
                           [0.0] * len(chunk), "all", new.shape[1]) if share_prefill else None
        if unsteered is not None:
            full_ids = torch.cat([unsteered.ids, new], dim=1)
            full_mask = torch.cat([unsteered.mask, gen_mask.to(unsteered.mask.dtype)], dim=1)
            run = functools.partial(forward_rest, model, unsteered, full_ids, full_mask)
        else:
            full_ids = torch.cat([cids, new], dim=1)
            full_mask = torch.cat([cmask, gen_mask.to(cmask.dtype)], dim=1)
            run = functools.partial(_forward_logits, model, full_ids, full_mask)
        logp = _generated_logprobs(run, nll_head, new, gen_mask)
        weights = gen_mask.float()
        row_nll = (-(logp * weights).sum(-1) / weights.sum(-1).clamp(min=1.0)).cpu()
        for row, (a, g) in enumerate(chunk):
            nll[a, g] = float(row_nll[row])
            texts[a][g] = tokenizer.decode(new[row][gen_mask[row]], skip_special_tokens=True).strip()
    return texts, nll
