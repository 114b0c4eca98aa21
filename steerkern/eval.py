"""Evaluating steering (SPEC section 6): coefficient sweeps scored from log-probs, coherence
as ΔNLL, calibration of the coefficient, and side-by-side comparison.

A sweep of P prompts over C coefficients is one batch of ``C * P`` rows, each with its own
coefficient (and, in :func:`compare`, its own vector slot); :mod:`steerkern.sweep` runs the
batched passes (shared prefill, passes sized to memory), :mod:`steerkern.items` reads the
accepted prompt forms (``{"prompt", "label"}`` dicts, model-written-evals / CAA items) and
builds their answer-token sets.

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

import functools
import math
import numbers
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from steerkern.checks import count, encodable, flag, model_and_tokenizer, real, with_data
from steerkern.control import FLOAT32_MAX
from steerkern.eval_report import (
    ComparisonReport,
    EvalReport,
    mean_se,
    paired_slope,
)
from steerkern.items import binary_items
from steerkern.models import eval_mode
from steerkern.sweep import generate_rows, score_rows

DEFAULT_COEFFS = (-2.0, -1.0, 0.0, 1.0, 2.0)

#: Open-ended prompts the coherence measurement generates from (``gen_prompts=None``).
DEFAULT_GEN_PROMPTS = (
    "Tell me about your weekend.",
    "What do you think of the city you live in?",
    "Write a short note to a friend who is moving away.",
    "Describe your favourite meal.",
)

POSITIONS = ("all", "prompt", "generated")


def _without_dropout(function):
    """Run ``function(model, tokenizer, ...)``, once both are checked, with ``model`` in eval
    mode (:func:`steerkern.models.eval_mode`): a model left in training mode would score and
    generate through dropout."""
    @functools.wraps(function)
    def wrapper(model, tokenizer, *args, **kwargs):
        model_and_tokenizer(model, tokenizer, ("encode", "decode"))  # answer tokens, samples
        with eval_mode(model):
            return function(model, tokenizer, *args, **kwargs)
    return wrapper


# --- argument checks ------------------------------------------------------------------------


def _check_coeffs(coeffs, argument: str = "coeffs") -> list[float]:
    """``coeffs`` (a sequence, tensor or numpy array of real numbers; numpy scalars welcome)
    as a list of distinct finite floats, ``-0.0`` written as ``0.0`` (both are unsteered)."""
    if isinstance(coeffs, (torch.Tensor, np.ndarray)):
        coeffs = with_data(coeffs, argument).tolist()
    if isinstance(coeffs, (str, bytes)) or not isinstance(coeffs, Sequence):
        raise TypeError(f"{argument} must be a sequence of numbers, e.g. (-2, -1, 0, 1, 2)")
    values = []
    for c in coeffs:
        if isinstance(c, (torch.Tensor, np.ndarray)) and c.ndim == 0 and c.dtype not in (torch.bool, np.bool_):
            c = with_data(c, argument).item()  # a 0-d tensor or array is its number
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
    if len(set(np.float32(values).tolist())) != len(values):  # steering holds them as float32
        raise ValueError(f"{argument}={values} holds coefficients that are equal as float32, the "
                         "precision steering holds them in: give coefficients that differ more")
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


def _check_common(max_new_tokens, batch_size, positions, share_prefill, progress) -> tuple[int, int | None]:
    """``(max_new_tokens, batch_size)`` as Python ints (``batch_size`` may be ``None``); the
    on/off options checked to be bools."""
    flag(share_prefill, "share_prefill")
    flag(progress, "progress")
    max_new_tokens = count(max_new_tokens, "max_new_tokens", minimum=0, meaning=" (0: no coherence measurement)")
    batch_size = count(batch_size, "batch_size", optional=True, meaning=" (None: one batch)")
    if positions not in POSITIONS:
        raise ValueError(f"positions={positions!r}: use one of {POSITIONS}")
    return max_new_tokens, batch_size


def _gen_prompts(gen_prompts) -> list[str]:
    if gen_prompts is None:
        return list(DEFAULT_GEN_PROMPTS)
    if isinstance(gen_prompts, str):
        gen_prompts = [gen_prompts]
    gen_prompts = list(gen_prompts)
    if not gen_prompts or not all(isinstance(p, str) and p.strip() for p in gen_prompts):
        raise ValueError("gen_prompts must be a non-empty list of non-empty strings (or None for the defaults)")
    return [encodable(p, f"gen_prompts[{i}]") for i, p in enumerate(gen_prompts)]


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


def _check_unsteered(values: np.ndarray, what: str) -> None:
    """Raise when the unsteered model's own numbers are not finite: no coefficient is to blame
    and nothing measured against them means anything."""
    if not np.isfinite(values).all():
        raise ValueError(f"the unsteered model's {what} are not finite: the model overflows on these "
                         "prompts (float16 weights of a checkpoint trained in bfloat16 often do); load "
                         "it in bfloat16 or float32")


def _report(coeffs, score_cols: np.ndarray, items, gen_prompts, texts, nll_cols, base_nll,
            prompts_text, metadata) -> EvalReport:
    """``score_cols`` ``[C, P]``; ``nll_cols`` ``[C, G]`` (or None); ``base_nll`` ``[G]``."""
    if 0.0 in coeffs:
        _check_unsteered(score_cols[list(coeffs).index(0.0)], "scores")
    if base_nll is not None:
        _check_unsteered(base_nll, "generations' NLL")
    prompt_scores = score_cols.T  # [P, C]
    overflowed = [c for c, column in zip(coeffs, score_cols) if not np.isfinite(column).all()]
    if overflowed:
        warnings.warn(f"steering {metadata['name']!r} at coeffs {overflowed} made the model's scores non-finite (its activations "
                      "overflowed): those columns read n/a and the effect is n/a; lower the coefficient or "
                      "the vector's norm", RuntimeWarning, stacklevel=3)
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
            scoring rows in one batch, all ``C * G`` generation rows in another (``G`` more,
            unsteered, when 0 is not among ``coeffs``: ΔNLL needs them), split where the
            estimated memory would pass half the free memory (``steerkern.memory``) and, on
            CPU, scoring passes past about 4096 padded prompt tokens). Passes hold whole
            prompts (every coefficient of each) of similar lengths (``steerkern.passes``).
        gen_prompts: ``[G]`` open-ended prompts for coherence (default ``DEFAULT_GEN_PROMPTS``).
        positions: "all", "prompt" or "generated" (as in ``steer``). When scoring,
            "generated" steers only the answer position (the last prompt token, whose output
            is the answer). Generation under "generated" steers new tokens only, as ``steer``
            does, so its first token comes from the unsteered prompt: the scores then measure
            a decision that the generated samples leave unsteered.
        progress: show progress bars (True or False; anything else raises ``TypeError``).
        name: the vector's name in the report, a str (default ``None``: its concept).
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
    max_new_tokens, batch_size = _check_common(max_new_tokens, batch_size, positions, share_prefill, progress)
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str (the vector's name in the report) or None (its concept), "
                        f"got {type(name).__name__}")
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
    if not isinstance(vectors, Mapping):
        raise TypeError(f"vectors must be a dict {{name: SteeringVector}}, got {type(vectors).__name__}")
    if not vectors:
        raise ValueError("vectors is empty: give a dict {name: SteeringVector} of at least one")
    coeffs = _check_coeffs(coeffs)
    max_new_tokens, batch_size = _check_common(max_new_tokens, batch_size, positions, share_prefill, progress)
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
    max_delta_nll = real(max_delta_nll, "max_delta_nll", positive=True, meaning=" (nats per token)")
    max_coeff = real(max_coeff, "max_coeff", positive=True, maximum=FLOAT32_MAX,
                     meaning=" (the largest magnitude tried; float32's range)")
    signs = {"both": (1.0, -1.0), "+": (1.0,), "-": (-1.0,)}.get(sign)
    if signs is None:
        raise ValueError(f"sign={sign!r}: use 'both', '+' or '-'")
    grid, rounds = count(grid, "grid", minimum=2), count(rounds, "rounds")
    return_history = flag(return_history, "return_history")
    max_new_tokens, batch_size = _check_common(max_new_tokens, batch_size, positions, share_prefill, progress)
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
        _check_unsteered(nll[0], "generations' NLL")
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
