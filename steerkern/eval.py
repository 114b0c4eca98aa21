"""Evaluating steering (SPEC section 6): batched coefficient sweeps scored from log-probs,
coherence as ΔNLL, calibration of the coefficient, and side-by-side comparison.

**One batch per sweep.** Sweeping P prompts over C coefficients is one batch of ``C * P`` rows:
row ``(j, p)`` is prompt ``p`` with its own coefficient ``c_j`` (and, in :func:`compare`, its
own vector slot), through ``steer(model, vectors, slots=..., coeff=...)``. A batch too big for
memory (a whole model-written-evals file) is split into as few equal passes as fit
(``steerkern.memory``); ``batch_size`` sets the rows per pass by hand.

**Shared prefill.** The rows of a sweep repeat work: every chat-rendered prompt starts with
the same template tokens, and when only generated tokens (or, when scoring, only the answer
position) are steered, a prompt's tokens are the same under every coefficient. With
``share_prefill=True`` (the default) that work runs once and its KV cache is copied to the
rows (``steerkern.prefill``): for ``C`` coefficients, ``P`` prompts of ``T`` tokens sharing
a ``k``-token prefix, a batch costs about ``C k + C P (T - k)`` prompt-token rows with the
prompt steered ("all"/"prompt") and ``k + P (T - 1 - k) + C P`` without ("generated"),
instead of ``C P T``. The unsteered NLL pass shares the same way. Results are those of the
plain batch up to float rounding.

**Scoring (binary choice).** The question is rendered with the tokenizer's chat template as the
user turn, followed by the start of the assistant's reply, so the next token is the answer. At
that position, with ``log p`` the model's next-token log-probabilities,

    score = log sum_{t in positive} p(t)  -  log sum_{t in negative} p(t)          (nats)

where the sets hold every single-token spelling of an answer ("Yes", " Yes", "yes", " yes",
"YES", ... as the vocabulary has them). Accepted prompt forms:

- ``{"prompt": str, "label": +1 | -1}``: positive = yes-variants, negative = no-variants when
  ``label = +1`` (answering yes agrees with the vector's positive side), swapped when ``-1``;
  i.e. ``score = label * (log p(yes) - log p(no))``. An optional ``"choices": ("A", "B")``
  (as ``steerkern.data.mwe_eval_prompts`` writes) makes it a letter item: then ``label = +1``
  means the first choice agrees.
- model-written-evals / CAA items ``{"question", "answer_matching_behavior",
  "answer_not_matching_behavior"}`` or ``steerkern.data.MWEItem`` s (``load_mwe``): positive = the matching
  answer, so ``score = log p(matching) - log p(not matching)``. Yes/No answers (" Yes"/" No")
  compare the yes/no variant sets. Letter answers (" (A)"/" (B)") are scored with the reply
  prefix ``"("`` rendered after the chat template, so the answer position predicts the letter,
  and compare the letters' variants ("A", " A" vs "B", " B"). Where an item lists several
  answers (``[" (B)", " (C)"]``), each side pools every listed letter's variants.

**Effect.** Each prompt's least-squares slope of score against coefficient; the effect is their
mean with its standard error over prompts (paired by prompt; ``steerkern.eval_report``).

**Coherence.** For a few open-ended prompts, every coefficient (and 0) generates
``max_new_tokens`` greedy tokens in one batched ``generate``. The *unsteered* model then reads
every generation (one batch again) and

    ΔNLL(c) = mean_g [ NLL(text_g(c)) - NLL(text_g(0)) ]

with ``NLL`` the mean negative log-likelihood per generated token (up to and including the
first end-of-sequence token), paired by generation prompt. Positive ΔNLL: the steered text is
less likely under the model's own judgement than its unsteered text.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from steerkern.control import FLOAT32_MAX
from steerkern.data import render_prompt
from steerkern.eval_report import (
    ComparisonReport,
    EvalReport,
    mean_se,
    paired_slope,
)
from steerkern.kvcache import (
    cache_argument,
    empty_model_cache,
    is_gatherable,
    positions_from_mask,
    reserve_columns,
    select_rows,
)
from steerkern.memory import rows_per_pass
from steerkern.models import eval_mode, input_device
from steerkern.prefill import SharedPrompt, forward_rest, shared_prefill
from steerkern.trunk import lowest_steered_layer

DEFAULT_COEFFS = (-2.0, -1.0, 0.0, 1.0, 2.0)

#: Open-ended prompts the coherence measurement generates from (``gen_prompts=None``).
DEFAULT_GEN_PROMPTS = (
    "Tell me about your weekend.",
    "What do you think of the city you live in?",
    "Write a short note to a friend who is moving away.",
    "Describe your favourite meal.",
)

YES_NO = ("yes", "no")
POSITIONS = ("all", "prompt", "generated")


# --- prompts --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BinaryItem:
    """A binary-choice question ready for scoring.

    Attributes:
        question: the user turn shown to the model.
        prefix: the start of the assistant's reply rendered before the answer token ("" or "(").
        positive, negative: token ids whose total probability the score compares.
        label: +1 / -1, the orientation: +1 when the positive side is "yes" (Yes/No items) or
            "A" (letter items).
        kind: "yes_no" or "letter".
    """

    question: str
    prefix: str
    positive: tuple[int, ...]
    negative: tuple[int, ...]
    label: int
    kind: str


def answer_token_ids(tokenizer, word: str, *, letter: bool = False) -> tuple[int, ...]:
    """Token ids of every single-token spelling of ``word``: with and without a leading space,
    and (unless ``letter``) in capitalised, lower and upper case. Spellings that the tokenizer
    splits into several tokens are skipped."""
    if letter:
        forms = (word, " " + word)
    else:
        forms = tuple(f for w in (word.capitalize(), word.lower(), word.upper()) for f in (w, " " + w))
    ids = set()
    for form in forms:
        encoded = tokenizer.encode(form, add_special_tokens=False)
        if len(encoded) == 1:
            ids.add(int(encoded[0]))
    if not ids:
        raise ValueError(f"the tokenizer has no single token for the answer {word!r} in any spelling "
                         f"{list(forms)}: this model cannot be scored on it")
    return tuple(sorted(ids))


def _answer_word(text) -> str:
    """' (A)' -> 'A', ' Yes' -> 'yes'."""
    if not isinstance(text, str):
        raise TypeError(f"answer must be a string like ' Yes' or ' (A)', got {type(text).__name__}")
    word = text.strip().strip("()").strip()
    if word.lower() in YES_NO:
        return word.lower()
    if len(word) == 1 and word.isalpha():
        return word.upper()
    raise ValueError(f"answer {text!r} is neither Yes/No nor a choice letter like ' (A)'")


def _answers(value, key: str) -> list[str]:
    """An answer or a list of answers (some model-written-evals files list several) -> their
    words in order without repeats: ``[" (B)", " (C)"]`` -> ``["B", "C"]``."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise ValueError(f"{key!r} is an empty list: give the answer, e.g. ' (A)' or ' Yes'")
    words = []
    for v in values:
        word = _answer_word(v)
        if word not in words:
            words.append(word)
    return words


def binary_items(tokenizer, prompts) -> list[BinaryItem]:
    """Turn ``prompts`` (``{"prompt", "label"}`` dicts or model-written-evals items) into
    :class:`BinaryItem` s. Raises ``ValueError`` naming the first bad entry."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise TypeError("prompts must be a list of {'prompt': str, 'label': +1|-1} dicts or "
                        "model-written-evals items {'question', 'answer_matching_behavior', ...}")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: give at least one binary-choice prompt")
    ids: dict[tuple[str, bool], tuple[int, ...]] = {}

    def variants(word: str) -> tuple[int, ...]:
        letter = word not in YES_NO
        if (word, letter) not in ids:
            ids[(word, letter)] = answer_token_ids(tokenizer, word, letter=letter)
        return ids[(word, letter)]

    items = []
    for index, entry in enumerate(prompts):
        try:
            items.append(_item(entry, variants))
        except (TypeError, ValueError, KeyError) as error:
            raise ValueError(f"prompts[{index}]: {error}") from None
    for item in items:
        if set(item.positive) & set(item.negative):
            raise ValueError("the tokenizer spells both answers with a shared token; cannot score")
    return items


def _item(entry, variants) -> BinaryItem:
    if all(hasattr(entry, a) for a in ("question", "matching", "not_matching")):  # data.MWEItem
        entry = {"question": entry.question, "answer_matching_behavior": entry.matching,
                 "answer_not_matching_behavior": entry.not_matching}
    if not isinstance(entry, Mapping):
        raise TypeError(f"expected a dict, got {type(entry).__name__}")
    if "prompt" in entry:
        question, label = entry["prompt"], entry.get("label")
        if not isinstance(question, str) or not question.strip():
            raise ValueError("'prompt' must be a non-empty string")
        if isinstance(label, bool) or label not in (1, -1):
            raise ValueError(f"'label' must be +1 or -1 (+1: answering yes agrees with the "
                             f"vector's positive side), got {label!r}")
        choices = entry.get("choices", ("Yes", "No"))
        if not (isinstance(choices, (list, tuple)) and len(choices) == 2):
            raise ValueError(f"'choices' must be two answers like ('Yes', 'No') or ('A', 'B'), got {choices!r}")
        first, second = (_answer_word(c) for c in choices)
        if (first in YES_NO) != (second in YES_NO) or first == second:
            raise ValueError(f"'choices' {choices!r} must be Yes/No or two different letters")
        kind, prefix = ("yes_no", "") if first in YES_NO else ("letter", "(")
        positive, negative = variants(first), variants(second)
        if label == -1:
            positive, negative = negative, positive
        return BinaryItem(question, prefix, positive, negative, int(label), kind)
    if "question" in entry and "answer_matching_behavior" in entry:
        question = entry["question"]
        if not isinstance(question, str) or not question.strip():
            raise ValueError("'question' must be a non-empty string")
        match = _answers(entry["answer_matching_behavior"], "answer_matching_behavior")
        other = entry.get("answer_not_matching_behavior")
        not_match = None if other is None else _answers(other, "answer_not_matching_behavior")
        shown = f"{entry['answer_matching_behavior']!r} / {other!r}"
        if match[0] in YES_NO:
            flip = "no" if match[0] == "yes" else "yes"
            if len(match) > 1 or (not_match is not None and not_match != [flip]):
                raise ValueError(f"answers {shown} mix Yes/No with another form")
            return BinaryItem(question, "", variants(match[0]), variants(flip),
                              1 if match[0] == "yes" else -1, "yes_no")
        if not_match is None:
            if len(match) != 1 or match[0] not in ("A", "B"):
                raise ValueError("'answer_not_matching_behavior' is needed beyond A/B choices")
            not_match = ["B" if match[0] == "A" else "A"]
        if any(w in YES_NO for w in match + not_match) or set(match) & set(not_match):
            raise ValueError(f"answers {shown} are not different letters")
        positive = tuple(sorted({t for w in match for t in variants(w)}))
        negative = tuple(sorted({t for w in not_match for t in variants(w)}))
        return BinaryItem(question, "(", positive, negative,
                          1 if min(match) < min(not_match) else -1, "letter")
    raise ValueError("expected {'prompt': str, 'label': +1|-1} or a model-written-evals item "
                     "with 'question' and 'answer_matching_behavior'")


def render(tokenizer, text: str, prefix: str = "", *, answer: bool = True) -> str:
    """The model input for ``text``: the chat template's user turn and the assistant's turn
    opened (plus ``prefix``). Without a chat template: ``"{text}\\nAnswer:"`` (+ ``" " + prefix``)
    when ``answer`` (``steerkern.data.render_prompt(..., answer_cue=True)``, the context
    ``mwe_pairs`` extracts in), else ``"{text}\\n"``."""
    if getattr(tokenizer, "chat_template", None):
        return render_prompt(tokenizer, text) + prefix
    if not answer:
        return render_prompt(tokenizer, text)
    return render_prompt(tokenizer, text, answer_cue=True) + (f" {prefix}" if prefix else "")


# --- batched model calls --------------------------------------------------------------------


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
    """Left-padded ``input_ids`` and ``attention_mask`` ``[len(texts), T]`` on ``device``.

    Padded here rather than by the tokenizer, so that neither its pad token nor its
    ``padding_side`` matters and the tokenizer is never modified."""
    special = not getattr(tokenizer, "chat_template", None)  # the template writes its own
    encoded = [list(map(int, seq)) for seq in tokenizer(texts, add_special_tokens=special)["input_ids"]]
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


def _chunks(model, total: int, batch_size: int | None, tokens: int, keep: int = 1):
    """``(start, stop)`` of each pass over ``total`` rows of ``tokens`` tokens: ``batch_size``
    rows at a time, or with ``None`` as few equal passes as fit memory (all rows in one for
    typical sweeps; ``steerkern.memory``)."""
    step = rows_per_pass(model, total, tokens, keep, batch_size)
    for start in range(0, total, step):
        yield start, min(start + step, total)


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
    count = len(items)
    rows = [(a, p) for a in range(len(arms)) for p in range(count)]
    scores = np.empty((len(arms), count), dtype=np.float64)
    with _bar(len(rows), "scoring", progress) as bar:
        for start, stop in _chunks(model, len(rows), batch_size, ids.shape[1]):
            chunk = rows[start:stop]
            prompt_index = torch.tensor([p for _, p in chunk], device=ids.device)
            slots, coeffs = [arms[a][0] for a, _ in chunk], [arms[a][1] for a, _ in chunk]
            shared = _share(model, tokenizer, vectors, ids, mask, prompt_index, slots, coeffs,
                            positions) if share_prefill else None
            if shared is not None:
                # what is left to run: the suffixes (prompt steered, "all"/"prompt") or the
                # answer position alone ("generated"); both are steered wholly
                with _steering(model, vectors, slots, coeffs, "all"):
                    logits = forward_rest(model, shared, shared.ids, shared.mask, keep=1)[:, -1]
            else:
                cids, cmask = ids[prompt_index], mask[prompt_index]
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
        out = model.generate(**inputs, generation_config=config, logits_processor=logits_processor)
    return out[:, prompt_len:]


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
    first = model.generate(**inputs, generation_config=first_config, logits_processor=logits_processor)
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
        out = model.generate(input_ids=rest_ids, attention_mask=rest_mask,
                             generation_config=rest_config, logits_processor=logits_processor,
                             **{cache_argument(model): cache})
    rest = out[:, width + 1:]
    new[live, 1:1 + rest.shape[1]] = rest
    return new[:, :1 + rest.shape[1]]


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
    count = len(prompts)
    rows = [(a, g) for a in range(len(arms)) for g in range(count)]
    eos = torch.tensor(_eos_ids(model, tokenizer), device=device)
    config = _greedy_config(model, tokenizer, max_new_tokens)
    texts = [[""] * count for _ in arms]
    nll = np.empty((len(arms), count), dtype=np.float64)
    for start, stop in _chunks(model, len(rows), batch_size, ids.shape[1] + max_new_tokens,
                               keep=max_new_tokens + 1):
        chunk = rows[start:stop]
        index = torch.tensor([g for _, g in chunk], device=device)
        slots, coeffs = [arms[a][0] for a, _ in chunk], [arms[a][1] for a, _ in chunk]
        cids, cmask = ids[index], mask[index]
        with _bar(max_new_tokens, f"generating {len(chunk)} rows", progress, unit="tok") as bar:
            new = sweep_generate(model, tokenizer, vectors, ids, mask, index, slots, coeffs,
                                 config=config, positions=positions, share_prefill=share_prefill,
                                 logits_processor=[_StepBar(bar)] if progress else None)
        is_eos = torch.isin(new, eos) if eos.numel() else torch.zeros_like(new, dtype=torch.bool)
        # keep tokens up to and including the first EOS
        gen_mask = (is_eos.long().cumsum(-1) - is_eos.long()) == 0
        unsteered = _share(model, tokenizer, vectors, ids, mask, index, [-1] * len(chunk),
                           [0.0] * len(chunk), "all", new.shape[1]) if share_prefill else None
        if unsteered is not None:
            full_ids = torch.cat([unsteered.ids, new], dim=1)
            full_mask = torch.cat([unsteered.mask, gen_mask.to(unsteered.mask.dtype)], dim=1)
            logits = forward_rest(model, unsteered, full_ids, full_mask, keep=new.shape[1] + 1)[:, :-1]
        else:
            full_ids = torch.cat([cids, new], dim=1)
            full_mask = torch.cat([cmask, gen_mask.to(cmask.dtype)], dim=1)
            logits = _forward_logits(model, full_ids, full_mask, keep=new.shape[1] + 1)[:, :-1]
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, new[..., None])[..., 0]
        weights = gen_mask.float()
        row_nll = (-(logp * weights).sum(-1) / weights.sum(-1).clamp(min=1.0)).cpu()
        for row, (a, g) in enumerate(chunk):
            nll[a, g] = float(row_nll[row])
            texts[a][g] = tokenizer.decode(new[row][gen_mask[row]], skip_special_tokens=True).strip()
    return texts, nll


def _without_dropout(function):
    """Run ``function(model, ...)`` with ``model`` in eval mode (:func:`steerkern.models.eval_mode`):
    a model left in training mode would score and generate through dropout."""
    @functools.wraps(function)
    def wrapper(model, *args, **kwargs):
        with eval_mode(model):
            return function(model, *args, **kwargs)
    return wrapper


# --- argument checks ------------------------------------------------------------------------


def _check_coeffs(coeffs, argument: str = "coeffs") -> list[float]:
    """``coeffs`` (a sequence, tensor or numpy array of real numbers; numpy scalars welcome)
    as a list of distinct finite floats, ``-0.0`` written as ``0.0`` (both are unsteered)."""
    if isinstance(coeffs, (torch.Tensor, np.ndarray)):
        coeffs = coeffs.tolist()
    if isinstance(coeffs, (str, bytes)) or not isinstance(coeffs, Sequence):
        raise TypeError(f"{argument} must be a sequence of numbers, e.g. (-2, -1, 0, 1, 2)")
    values = []
    for c in coeffs:
        if isinstance(c, (bool, np.bool_)) or not isinstance(c, numbers.Real):
            raise TypeError(f"{argument} must hold numbers, got {c!r}")
        c = float(c)
        if not math.isfinite(c):
            raise ValueError(f"{argument} holds {c!r}: give finite coefficients")
        if abs(c) > FLOAT32_MAX:  # steering runs in float32 or narrower
            raise ValueError(f"{argument} holds {c!r}, beyond float32's range (|c| <= {FLOAT32_MAX:.3g}): "
                             "give smaller coefficients")
        values.append(c + 0.0)  # -0.0 + 0.0 == +0.0
    if len(set(values)) != len(values):
        raise ValueError(f"{argument}={values} repeats a coefficient: give each once")
    if len(values) < 2:
        raise ValueError(f"{argument}={values}: a sweep needs at least two coefficients")
    return values


def _check_vector(model, vector, argument: str = "vector"):
    from steerkern.vectors import SteeringVector

    if not isinstance(vector, SteeringVector):
        raise TypeError(f"{argument} must be a SteeringVector (steerkern.extract or "
                        f"SteeringVector.load), got {type(vector).__name__}")
    try:
        vector.validate(model)
    except (ValueError, TypeError) as error:
        raise type(error)(f"{argument}: {error}") from None
    return vector


def _check_common(max_new_tokens, batch_size, positions):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0 (0: no coherence measurement), got {max_new_tokens!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be None (one batch) or an int >= 1, got {batch_size!r}")
    if positions not in POSITIONS:
        raise ValueError(f"positions={positions!r}: use one of {POSITIONS}")


def _gen_prompts(gen_prompts) -> list[str]:
    if gen_prompts is None:
        return list(DEFAULT_GEN_PROMPTS)
    if isinstance(gen_prompts, str):
        gen_prompts = [gen_prompts]
    gen_prompts = list(gen_prompts)
    if not gen_prompts or not all(isinstance(p, str) and p.strip() for p in gen_prompts):
        raise ValueError("gen_prompts must be a non-empty list of non-empty strings (or None for the defaults)")
    return gen_prompts


def _eval_prompts(prompts, vector):
    if prompts is not None:
        return prompts
    concept = vector.metadata.get("concept")
    if not concept:
        raise ValueError("prompts=None uses the eval prompts of the vector's concept, but the vector's "
                         "metadata names none: pass prompts=[{'prompt': ..., 'label': +1 or -1}, ...]")
    from steerkern.data import concept_eval_prompts, list_concepts

    if concept not in list_concepts():
        raise ValueError(f"prompts=None uses the eval prompts of the vector's concept, but "
                         f"concept={concept!r} ships none (shipped: {list_concepts()}): pass "
                         "prompts=[{'prompt': ..., 'label': +1 or -1}, ...] or model-written-evals "
                         "items (steerkern.load_mwe)")
    return concept_eval_prompts(concept)


# --- reports from raw matrices --------------------------------------------------------------


def _report(coeffs, score_cols: np.ndarray, items, gen_prompts, texts, nll_cols, base_nll,
            prompts_text, metadata) -> EvalReport:
    """``score_cols`` ``[C, P]``; ``nll_cols`` ``[C, G]`` (or None); ``base_nll`` ``[G]``."""
    prompt_scores = score_cols.T  # [P, C]
    effect, effect_se = paired_slope(coeffs, prompt_scores)
    score_mean, score_se = mean_se(prompt_scores, axis=0)
    if nll_cols is None:
        nan = [float("nan")] * len(coeffs)
        delta, delta_se, nll = nan, nan, nan
    else:
        delta, delta_se = mean_se(nll_cols - base_nll[None, :], axis=1)
        nll = nll_cols.mean(axis=1)
    return EvalReport(
        coeffs=list(coeffs), effect=effect, effect_se=effect_se,
        scores=score_mean.tolist(), score_se=score_se.tolist(),
        delta_nll=list(map(float, delta)), delta_nll_se=list(map(float, delta_se)),
        nll=list(map(float, nll)), prompt_scores=prompt_scores.tolist(), prompts=prompts_text,
        labels=[it.label for it in items], gen_prompts=list(gen_prompts) if nll_cols is not None else [],
        samples={c: list(t) for c, t in zip(coeffs, texts)} if nll_cols is not None else {},
        metadata=metadata,
    )


def _metadata(model, vector, name, items, positions, max_new_tokens) -> dict:
    from steerkern.models import model_id

    kinds: dict[str, int] = {}
    for it in items:
        kinds[it.kind] = kinds.get(it.kind, 0) + 1
    return {"model": model_id(model), "name": name or vector.metadata.get("concept") or "vector",
            "concept": vector.metadata.get("concept"), "method": vector.metadata.get("method"),
            "vector": dict(vector.metadata), "positions": positions,
            "max_new_tokens": max_new_tokens, "item_kinds": kinds}


# --- public API -----------------------------------------------------------------------------


@_without_dropout
def evaluate(model, tokenizer, vector, *, coeffs=DEFAULT_COEFFS, prompts=None, max_new_tokens=48,
             batch_size=None, gen_prompts=None, positions="all", progress=False,
             name=None, share_prefill=True) -> EvalReport:
    """Sweep ``vector`` over ``coeffs``: behaviour score, effect slope, coherence (ΔNLL).

    Args:
        model, tokenizer: a causal LM and its tokenizer (``steerkern.load_model``).
        vector: the ``SteeringVector`` to evaluate.
        coeffs: ``[C]`` coefficients (distinct, at least two; default ``(-2, -1, 0, 1, 2)``).
        prompts: ``[P]`` binary-choice prompts, ``{"prompt": str, "label": +1|-1}`` or
            model-written-evals items; ``None``: the shipped eval prompts of the vector's
            ``metadata["concept"]`` (``steerkern.data.concept_eval_prompts``).
        max_new_tokens: tokens generated per (generation prompt, coefficient) for ΔNLL and the
            samples; 0 skips generation.
        batch_size: most rows per forward pass / generate call (default ``None``: all ``C * P``
            scoring rows in one batch, all ``(C + 1) * G`` generation rows in another, split
            into equal passes only where the estimated memory would pass half the free memory,
            ``steerkern.memory``).
        gen_prompts: ``[G]`` open-ended prompts for coherence (default ``DEFAULT_GEN_PROMPTS``).
        positions: "all", "prompt" or "generated" (as in ``steer``); when scoring, "generated"
            steers only the answer position.
        progress: show progress bars.
        name: the vector's name in the report (default: its concept).
        share_prefill: run prompt work shared between rows once and copy its KV cache
            (``steerkern.prefill``): the chat template's common prefix once per coefficient
            and the layers below the lowest steered one once per prompt (``steerkern.trunk``),
            and with ``positions="generated"`` every prompt but its last token once for all
            coefficients. Same results up to float rounding; ``False`` runs every row's whole
            prompt. Models whose cache cannot be shared fall back to that by themselves.

    Returns:
        :class:`EvalReport` (``str(report)`` is the markdown table; ``report.save(dir)``).

    Example:
        >>> report = evaluate(model, tokenizer, vector, coeffs=(-4, 0, 4))   # doctest: +SKIP
        >>> print(report); report.save("out/")                              # doctest: +SKIP
    """
    coeffs = _check_coeffs(coeffs)
    _check_common(max_new_tokens, batch_size, positions)
    vector = _check_vector(model, vector)
    items = binary_items(tokenizer, _eval_prompts(prompts, vector))
    gens = _gen_prompts(gen_prompts)
    arms = [(-1 if c == 0 else 0, c) for c in coeffs]
    scores = score_rows(model, tokenizer, [vector], items, arms, batch_size=batch_size,
                        positions=positions, progress=progress, share_prefill=share_prefill)
    texts, nll_cols, base = [[] for _ in coeffs], None, None
    if max_new_tokens > 0:
        gen_arms = arms + ([(-1, 0.0)] if 0.0 not in coeffs else [])
        all_texts, nll = generate_rows(model, tokenizer, [vector], gens, gen_arms,
                                       max_new_tokens=max_new_tokens, batch_size=batch_size,
                                       positions=positions, progress=progress,
                                       share_prefill=share_prefill)
        base_arm = gen_arms.index((-1, 0.0))
        texts, nll_cols, base = all_texts[: len(coeffs)], nll[: len(coeffs)], nll[base_arm]
    metadata = _metadata(model, vector, name, items, positions, max_new_tokens)
    return _report(coeffs, scores, items, gens, texts, nll_cols, base,
                   [it.question for it in items], metadata)


@_without_dropout
def compare(model, tokenizer, vectors: Mapping, *, coeffs=DEFAULT_COEFFS, prompts=None,
            max_new_tokens=48, batch_size=None, gen_prompts=None, positions="all",
            progress=False, share_prefill=True) -> ComparisonReport:
    """Evaluate several vectors side by side in one batch (per-row vector slots).

    Args:
        vectors: ``{name: SteeringVector}``; every row of the batch picks its vector by slot,
            so all of them run in the same forward pass / generate call. The unsteered rows
            (coefficient 0) are shared.
        prompts: as in :func:`evaluate`; ``None`` requires every vector to name the same concept.
        Other arguments: as in :func:`evaluate`.

    Returns:
        :class:`ComparisonReport` with one :class:`EvalReport` per name.
    """
    if not isinstance(vectors, Mapping) or not vectors:
        raise ValueError("vectors must be a non-empty dict {name: SteeringVector}")
    coeffs = _check_coeffs(coeffs)
    _check_common(max_new_tokens, batch_size, positions)
    names = [str(n) for n in vectors]
    if len(set(names)) != len(names):
        raise ValueError(f"vectors has names that are equal as text {names}: the report keys them by "
                         "str(name), so give every vector a distinct name")
    bank = [_check_vector(model, v, f"vectors[{n!r}]") for n, v in vectors.items()]
    if prompts is None:
        concepts = {v.metadata.get("concept") for v in bank}
        if len(concepts) != 1:
            raise ValueError(f"prompts=None but the vectors name different concepts {sorted(map(str, concepts))}: "
                             "pass prompts= explicitly")
    items = binary_items(tokenizer, _eval_prompts(prompts, bank[0]))
    gens = _gen_prompts(gen_prompts)
    arms = [(-1, 0.0)] + [(k, c) for k in range(len(bank)) for c in coeffs if c != 0]

    def arm_index(k: int, c: float) -> int:
        return 0 if c == 0 else arms.index((k, c))

    score_arms = arms if 0.0 in coeffs else arms[1:]
    offset = 0 if 0.0 in coeffs else 1
    scores = score_rows(model, tokenizer, bank, items, score_arms, batch_size=batch_size,
                        positions=positions, progress=progress, share_prefill=share_prefill)
    all_texts, nll = None, None
    if max_new_tokens > 0:
        all_texts, nll = generate_rows(model, tokenizer, bank, gens, arms,
                                       max_new_tokens=max_new_tokens, batch_size=batch_size,
                                       positions=positions, progress=progress,
                                       share_prefill=share_prefill)
    reports = {}
    for k, name in enumerate(names):
        rows = [arm_index(k, c) for c in coeffs]
        texts = [all_texts[r] for r in rows] if all_texts is not None else [[] for _ in coeffs]
        nll_cols = nll[rows] if nll is not None else None
        base = nll[0] if nll is not None else None
        metadata = _metadata(model, bank[k], name, items, positions, max_new_tokens)
        reports[name] = _report(coeffs, scores[[r - offset for r in rows]], items, gens, texts,
                                nll_cols, base, [it.question for it in items], metadata)
    return ComparisonReport(reports)


@_without_dropout
def calibrate(model, tokenizer, vector, *, max_delta_nll=0.5, max_coeff=16.0, sign="both",
              grid=6, rounds=2, gen_prompts=None, max_new_tokens=32, batch_size=None,
              positions="all", progress=False, return_history=False, share_prefill=True):
    """The largest coefficient magnitude whose ΔNLL stays within ``max_delta_nll``.

    Search, one batched generate per round: round 1 tries ``grid`` magnitudes spaced
    geometrically up to ``max_coeff`` (``max_coeff / 2**(grid-1), ..., max_coeff / 2,
    max_coeff``); the answer lies between the largest magnitude whose ΔNLL, and that of every
    smaller one, is within budget, and the next one up. Each further round tries ``grid``
    magnitudes evenly spaced strictly inside that interval. A magnitude is within budget when
    the mean ΔNLL over the generation prompts is ``<= max_delta_nll`` for the signs in ``sign``.

    Args:
        max_delta_nll: the budget, nats per token (> 0).
        max_coeff: the largest magnitude considered (returned if even it is within budget).
        sign: "both" (``+m`` and ``-m`` must both be within budget), "+" or "-".
        grid: magnitudes per round (>= 2); rounds: number of rounds (>= 1).
        return_history: also return ``[(magnitude, {sign: ΔNLL})]`` of every magnitude tried.
        Other arguments: as in :func:`evaluate`.

    Returns:
        the magnitude (a float ``>= 0``; 0.0 when even the smallest magnitude tried exceeds the
        budget), or ``(magnitude, history)`` with ``return_history``.
    """
    if isinstance(max_delta_nll, bool) or not isinstance(max_delta_nll, (int, float)) \
            or not math.isfinite(max_delta_nll) or max_delta_nll <= 0:
        raise ValueError(f"max_delta_nll must be a positive number (nats per token), got {max_delta_nll!r}")
    if isinstance(max_coeff, bool) or not isinstance(max_coeff, (int, float)) \
            or not math.isfinite(max_coeff) or not 0 < max_coeff <= FLOAT32_MAX:
        raise ValueError(f"max_coeff must be a positive number within float32's range "
                         f"(<= {FLOAT32_MAX:.3g}), got {max_coeff!r}")
    signs = {"both": (1.0, -1.0), "+": (1.0,), "-": (-1.0,)}.get(sign)
    if signs is None:
        raise ValueError(f"sign={sign!r}: use 'both', '+' or '-'")
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 2:
        raise ValueError(f"grid must be an int >= 2, got {grid!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    _check_common(max_new_tokens, batch_size, positions)
    if max_new_tokens < 1:
        raise ValueError("calibrate needs max_new_tokens >= 1: ΔNLL is measured on generations")
    vector = _check_vector(model, vector)
    gens = _gen_prompts(gen_prompts)
    history: dict[float, dict[str, float]] = {}

    def measure(magnitudes: list[float]) -> None:
        arms = [(-1, 0.0)] + [(0, s * m) for m in magnitudes for s in signs]
        _, nll = generate_rows(model, tokenizer, [vector], gens, arms, max_new_tokens=max_new_tokens,
                               batch_size=batch_size, positions=positions, progress=progress,
                               share_prefill=share_prefill)
        delta = (nll - nll[0][None, :]).mean(axis=1)
        for i, (_, c) in enumerate(arms[1:], start=1):
            history.setdefault(abs(c), {})["+" if c > 0 else "-"] = float(delta[i])

    def within(m: float) -> bool:
        return all(v <= max_delta_nll for v in history[m].values())

    magnitudes = [max_coeff / 2 ** (grid - 1 - i) for i in range(grid)]
    low, high = 0.0, None
    for round_index in range(rounds):
        if round_index > 0:
            if high is None:
                break
            step = (high - low) / (grid + 1)
            magnitudes = [low + step * (i + 1) for i in range(grid)]
        measure(magnitudes)
        low, high = 0.0, None
        for m in sorted(history):
            if within(m):
                low = m
            else:
                high = m
                break
    if return_history:
        return low, sorted(history.items())
    return low
