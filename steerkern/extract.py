"""Extract steering vectors from contrast pairs (SPEC section 4).

Pipeline: pairs -> this process's share of them -> activations at the last non-pad token(s)
of each text, captured by hooks on the requested modules only (:mod:`steerkern.capture`) ->
gathered across processes when distributed -> the method's maths
(:mod:`steerkern.directions`) -> :class:`~steerkern.vectors.SteeringVector`.

Sign and scale (every method): a positive coefficient moves toward *chosen*, and coefficient 1
shifts the activations' projection on the direction by the mean projected pair separation
(see :mod:`steerkern.directions`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

from steerkern import _callable_module
from steerkern import directions as maths
from steerkern.capture import capture, check_read_token_index, last_positions, vjp_gradients
from steerkern.checks import count, flag, model_and_tokenizer
from steerkern.data import PairSet, as_pairs, pair_text_name
from steerkern.models import (
    RESIDUAL,
    as_layer_list,
    check_layer,
    default_layers,
    eval_mode,
    hidden_size,
    model_id,
    model_type,
    module_weight,
    num_layers,
    resolve_module,
)
from steerkern.vectors import SteeringPart, SteeringVector

__all__ = ["extract", "capture", "last_positions"]

SCALE_NOTE = "coefficient 1 shifts the projection on the direction by the mean pair separation"


# --- arguments -------------------------------------------------------------------------------


@dataclass
class _Plan:
    """Validated arguments of one extraction."""

    method: str
    layers: list[int]
    target: str
    rank: int
    last_n_tokens: int
    batch_size: int | None
    share_prefixes: bool = True
    read_token_index: object = -1  # an int or a callable text -> int (steerkern.capture.read_spans)
    readout: int | None = None
    fisher_lambda: float | None = None
    weights: dict = field(default_factory=dict)  # weight_svd: {layer: W [out, in]}


def _check_layers(model, layers) -> list[int]:
    if layers is None:
        return default_layers(model)
    return sorted({check_layer(model, layer, "layers") for layer in as_layer_list(layers)})


def _plan(model, method, layers, rank, last_n_tokens, target, batch_size, readout_layer,
          fisher_lambda, share_prefixes, read_token_index) -> _Plan:
    if not callable(method) and method not in maths.METHODS:
        raise ValueError(f"method={method!r} is not one of {list(maths.METHODS)} or a callable "
                         "(chosen [n, D], rejected [n, D]) -> direction [D]")
    if method != "grad" and (readout_layer is not None or fisher_lambda is not None):
        raise ValueError("readout_layer and fisher_lambda apply to method='grad' only")
    share_prefixes = flag(share_prefixes, "share_prefixes")
    plan = _Plan(method, _check_layers(model, layers), target, count(rank, "rank"),
                 count(last_n_tokens, "last_n_tokens"),
                 count(batch_size, "batch_size", optional=True), bool(share_prefixes),
                 check_read_token_index(read_token_index))
    modules = {layer: resolve_module(model, layer, target) for layer in plan.layers}
    if method == "weight_svd":
        for layer, module in modules.items():
            try:
                plan.weights[layer] = module_weight(module)
            except ValueError:
                raise ValueError(
                    f"method='weight_svd' needs a linear target (e.g. target='mlp.down_proj' or "
                    f"'self_attn.o_proj'), but target={target!r} is a {type(module).__name__}"
                ) from None
    if method == "grad":
        n = num_layers(model)
        plan.readout = (min(n - 1, max(plan.layers) + max(1, n // 4)) if readout_layer is None
                        else check_layer(model, readout_layer, "readout_layer"))
        if plan.readout <= max(plan.layers):
            if readout_layer is None:  # the default read-out is the last layer
                raise ValueError(
                    f"method='grad' reads the effect of steering at a deeper layer, but layers "
                    f"includes {max(plan.layers)}, the model's last (it has {n}): steer layers "
                    f"below {n - 1}")
            raise ValueError(
                f"readout_layer={plan.readout} must be deeper than every steered layer "
                f"(max {max(plan.layers)})"
            )
        if fisher_lambda is not None and (isinstance(fisher_lambda, bool) or not isinstance(fisher_lambda, numbers.Real)
                                          or not 0 < float(fisher_lambda) < math.inf):
            raise ValueError(f"fisher_lambda must be None or a finite number > 0, got {fisher_lambda!r}")
        plan.fisher_lambda = None if fisher_lambda is None else float(fisher_lambda)
    return plan


def _check_rows(plan: _Plan, n_pairs: int) -> None:
    """Refuse, before any pass, what the number of pairs or the weights already rule out (the
    maths would refuse it only after every capture pass)."""
    rows = n_pairs * plan.last_n_tokens  # difference rows: one per pair and token read
    if plan.method == "pca_diff" and rows < 2:
        raise ValueError("extract(method='pca_diff'): a principal component needs at least 2 difference "
                         "rows (one per pair and token read), and 1 pair read at 1 token gives 1: give "
                         "more pairs, raise last_n_tokens or use method='mean_diff'")
    if plan.method == "lowrank" and plan.rank > rows:
        raise ValueError(f"extract(method='lowrank'): rank={plan.rank} exceeds the {rows} difference rows "
                         f"(one per pair and token read): lower rank or give more pairs")
    for layer, weight in plan.weights.items():  # weight_svd
        if plan.rank > min(weight.shape):
            raise ValueError(f"extract(method='weight_svd') at layer {layer}: rank={plan.rank} must be between "
                             f"1 and the weight's rank bound {min(weight.shape)}")


# --- distributed -------------------------------------------------------------------------------


class _Shard:
    """This process's share of the pairs (pair ``i`` goes to process ``i % world``) and the
    gathering of per-text results back into global order on every process."""

    def __init__(self, pair_set: PairSet, accelerator):
        if accelerator is not None:
            try:
                self.world, self.rank = int(accelerator.num_processes), int(accelerator.process_index)
            except (AttributeError, TypeError, ValueError):
                raise TypeError(f"accelerator must be an accelerate.Accelerator (with num_processes and "
                                f"process_index), got {type(accelerator).__name__}") from None
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            self.world, self.rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        else:
            self.world, self.rank = 1, 0
        self.n_pairs = len(pair_set)
        mine = range(self.rank, self.n_pairs, self.world)
        self.texts = [text for i in mine for text in pair_set.pairs[i]]
        self.text_ids = [2 * i + member for i in mine for member in (0, 1)]

    def text_name(self, local: int) -> str:
        """Local text ``local`` as the argument it came from: ``pairs[i] (chosen)``."""
        return pair_text_name(self.text_ids[local])

    def local(self, work):
        """``work()`` run on this process's share, then settled with every process before the
        next collective: if it raised on any process, it raises on every process (the process
        that failed re-raises its own error; the others name it and quote it). Otherwise the
        processes that did not fail would wait in :meth:`gather` for one that never comes (or
        pair its gather with the failed process's next one and mix two extractions)."""
        try:
            result, error = work(), None
        except Exception as caught:  # noqa: BLE001 -- shared with every process, then re-raised
            result, error = None, caught
        if self.world > 1:
            errors = [None] * self.world
            torch.distributed.all_gather_object(
                errors, None if error is None else (type(error).__name__, str(error)))
            failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
            if failed and error is None:
                rank, (kind, message) = failed[0]
                raise RuntimeError(f"extract failed on process {rank} of {self.world} ({kind}: {message}); "
                                   f"every process stops: fix that input and run again on every process")
        if error is not None:
            raise error
        return result

    def gather(self, per_layer: dict, layers: list[int]) -> dict[int, torch.Tensor]:
        """``{layer: [n_local_texts, ...]}`` -> ``{layer: [2 * n_pairs, ...]}`` in global text
        order (chosen at even rows, rejected at odd rows), identical on every process."""
        result = {}
        for layer in layers:
            local = {index: per_layer[layer][j] for j, index in enumerate(self.text_ids)}
            if self.world > 1:
                everyone = [None] * self.world
                torch.distributed.all_gather_object(everyone, local)
                local = {k: v for part in everyone for k, v in part.items()}
            result[layer] = torch.stack([local[i] for i in range(2 * self.n_pairs)])
        return result


# --- extraction --------------------------------------------------------------------------------


def _members(tensor: torch.Tensor):
    """``[2n, n_last, D]`` (chosen, rejected interleaved) -> chosen, rejected ``[n * n_last, D]``."""
    width = tensor.shape[-1]
    return tensor[0::2].reshape(-1, width), tensor[1::2].reshape(-1, width)


def _read(model, tokenizer, plan: _Plan, shard: _Shard, show: bool):
    """Activations (and module inputs for weight_svd, per-example VJPs for grad), gathered.
    Each process's own passes run inside :meth:`_Shard.local`, so that an error on one process
    (a text too long for the model, or shorter than ``last_n_tokens``, in its share only)
    stops every process instead of leaving the others waiting in a gather."""
    layers = plan.layers
    acts, inputs = shard.local(lambda: _capture_share(model, tokenizer, plan, shard, show))
    acts = shard.gather(acts, layers + ([plan.readout] if plan.method == "grad" else []))
    if plan.method == "weight_svd":
        inputs = shard.gather(inputs, layers)
    grads = {}
    if plan.method == "grad":
        cho, rej = _members(acts[plan.readout])
        d = (cho - rej).mean(0)
        local = shard.local(lambda: vjp_gradients(
            model, tokenizer, shard.texts, layers, plan.readout, d, target=plan.target,
            last_n_tokens=plan.last_n_tokens, batch_size=plan.batch_size or 8, progress=show,
            text_names=shard.text_name, read_token_index=plan.read_token_index) if shard.texts else {})
        grads = shard.gather(local, layers)
    return acts, inputs, grads


def _capture_share(model, tokenizer, plan: _Plan, shard: _Shard, show: bool):
    """``(acts, inputs)`` of this process's texts, ``{layer: [n_local_texts, n_last, D]}`` each
    (``inputs`` for weight_svd only; the read-out layer added for grad); ``({}, {})`` when it
    has no texts."""
    if not shard.texts:
        return {}, {}
    one_pass = plan.method == "grad" and plan.target == RESIDUAL  # read-out in the same pass
    wanted = plan.layers + ([plan.readout] if one_pass else [])
    got = capture(model, tokenizer, shard.texts, wanted, target=plan.target,
                  last_n_tokens=plan.last_n_tokens, batch_size=plan.batch_size or 16,
                  inputs=plan.method == "weight_svd", progress=show,
                  desc=f"extract {_method_name(plan.method)}", share_prefixes=plan.share_prefixes,
                  text_names=shard.text_name, read_token_index=plan.read_token_index)
    acts, inputs = got if plan.method == "weight_svd" else (got, {})
    if plan.method == "grad" and not one_pass:  # the read-out is always the residual stream
        acts.update(capture(model, tokenizer, shard.texts, [plan.readout],
                            last_n_tokens=plan.last_n_tokens, batch_size=plan.batch_size or 16,
                            progress=False, share_prefixes=plan.share_prefixes,
                            text_names=shard.text_name, read_token_index=plan.read_token_index))
    return acts, inputs


def _part(plan: _Plan, layer: int, acts, inputs, grads) -> SteeringPart:
    try:
        return _method_part(plan, layer, acts, inputs, grads)
    except ValueError as error:  # the maths cannot name the layer or the method
        raise ValueError(f"extract(method={_method_name(plan.method)!r}) at layer {layer}: {error}") from None


def _method_part(plan: _Plan, layer: int, acts, inputs, grads) -> SteeringPart:
    cho, rej = _members(acts[layer])
    if callable(plan.method):
        return SteeringPart(bias=_custom_direction(plan.method, cho, rej))
    if plan.method in ("mean_diff", "pca_diff", "pca_center", "logistic"):
        return SteeringPart(bias=maths.additive(plan.method, cho, rej))
    if plan.method == "grad":
        maths.check_pairs(cho, rej)
        return SteeringPart(bias=maths.grad_direction(grads[layer], cho - rej, plan.fisher_lambda))
    if plan.method == "lowrank":
        bias, A, B = maths.lowrank(cho, rej, plan.rank)
        return SteeringPart(bias=bias, A=A, B=B)
    maths.check_pairs(cho, rej)  # weight_svd
    x = inputs[layer].reshape(-1, inputs[layer].shape[-1])
    A, B = maths.weight_svd(cho - rej, x, plan.weights[layer], plan.rank)
    return SteeringPart(A=A, B=B, source="input")


def _method_name(method) -> str:
    """A method's name: itself, or ``custom:<name>`` for a callable."""
    return f"custom:{getattr(method, '__name__', type(method).__name__)}" if callable(method) else method


def _custom_direction(method, cho: torch.Tensor, rej: torch.Tensor) -> torch.Tensor:
    """``method(cho, rej)`` checked: a real tensor (or array) of shape ``[D]`` with finite values
    (the "method's result" errors name the layer in :func:`_part`)."""
    with torch.no_grad():
        got = method(cho.clone(), rej.clone())  # copies: a method that works in place cannot alter the reads
    if not isinstance(got, torch.Tensor):
        try:
            got = torch.as_tensor(got)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"method (a callable) must return a tensor [D], got {type(got).__name__}") from None
    if not got.is_floating_point() or tuple(got.shape) != (cho.shape[-1],):
        raise ValueError(f"method (a callable) must return a float tensor of shape [{cho.shape[-1]}] "
                         f"(one direction), got {got.dtype} of shape {tuple(got.shape)}")
    if not bool(torch.isfinite(got).all()):
        raise ValueError("method (a callable) returned NaN or Inf values: return a finite direction")
    return got.detach().to("cpu", cho.dtype).clone()


def _metadata(model, plan: _Plan, pair_set: PairSet, concept) -> dict:
    metadata = {
        "model": model_id(model),
        "model_type": model_type(model),
        "hidden_size": hidden_size(model),
        "method": _method_name(plan.method),
        "concept": concept if concept is not None else pair_set.concept,
        "target": plan.target,
        "last_n_tokens": plan.last_n_tokens,
        "n_pairs": len(pair_set),
        "scale": "as the custom method returned it" if callable(plan.method) else SCALE_NOTE,
    }
    if plan.read_token_index != -1:
        index = plan.read_token_index
        metadata["read_token_index"] = (f"callable:{getattr(index, '__name__', type(index).__name__)}"
                                        if callable(index) else int(index))
    if plan.method in ("lowrank", "weight_svd"):
        metadata["rank"] = plan.rank
    if plan.method == "logistic":  # the probe's L2 strength, 1 / (its 2 * n_pairs * last_n_tokens rows)
        metadata["probe_lambda"] = 1.0 / (2 * len(pair_set) * plan.last_n_tokens)
    if plan.method == "grad":
        metadata["readout_layer"] = plan.readout
        metadata["fisher_lambda"] = plan.fisher_lambda
    return {k: v for k, v in metadata.items() if v is not None}


def extract(model, tokenizer, pairs, *, layers=None, method: str = "mean_diff", rank: int = 1,
            last_n_tokens: int = 1, target: str = RESIDUAL, batch_size: int | None = None,
            accelerator=None, progress: bool = True, readout_layer: int | None = None,
            fisher_lambda: float | None = None, concept: str | None = None,
            share_prefixes: bool = True, read_token_index=-1) -> SteeringVector:
    """Extract a steering vector from contrast pairs.

    Args:
        model, tokenizer: a Hugging Face causal LM (possibly sharded with ``device_map``) and its
            tokenizer (whatever its ``padding_side``, batches are padded on the right and
            read where the attention mask says, so either side gives the same vector).
        pairs: ``[(chosen, rejected), ...]`` strings, ``(chosen_list, rejected_list)``, or a
            :class:`~steerkern.data.PairSet` from :func:`~steerkern.data.make_pairs`.
        layers: layer index or list; default :func:`~steerkern.models.default_layers` (middle band).
        method: ``"mean_diff"`` (default; the best at equal coherence cost on the shipped concepts,
            research_notes.md) ``| "pca_diff" | "pca_center" | "logistic" | "lowrank" |
            "weight_svd" | "grad"`` (maths and scale in :mod:`steerkern.directions`; ``logistic``
            is a linear probe's normal, L2-regularised logistic regression of chosen vs rejected
            rows at ``λ = 1 / rows`` on centred features of RMS norm 1, recorded as metadata
            ``probe_lambda``), or a callable
            ``method(chosen, rejected) -> direction`` called once per layer with the reads as
            float32 CPU tensors ``[n_pairs * last_n_tokens, D]`` (row ``i`` of both from the
            same pair and token) and returning ``[D]``: the additive part at that layer, used
            as returned (its sign and scale are the callable's; metadata ``method`` is
            ``"custom:<name>"``).
        rank: rank of ``lowrank`` / ``weight_svd``.
        last_n_tokens: how many final non-pad tokens of each text are read (aligned from the right).
        read_token_index: the token whose state is read (the last of the ``last_n_tokens``):
            -1 (default) the last token, an int index into each text's token ids (the
            tokenizer's BOS first when it adds one; negative counts from the end), or a
            callable ``text -> int`` called on every chosen and rejected text
            (:func:`steerkern.capture.capture`).
        target: ``"residual"`` or a sub-module name (``"mlp.down_proj"``, ...); ``weight_svd``
            needs a linear module.
        batch_size: texts per forward pass (default 16; 8 for the backward passes of ``grad``).
        accelerator: an ``accelerate.Accelerator``; with several processes (or an initialised
            ``torch.distributed``) the pairs are split and the activations gathered, giving
            the same vector on every process as one process would.
        progress: show a tqdm progress bar (main process only); True or False.
        readout_layer: ``grad`` only: the deeper read-out layer ``L'`` (default
            ``min(n_layers - 1, max(layers) + n_layers // 4)``).
        fisher_lambda: ``grad`` only: precondition with ``(F + λI)^{-1}`` (empirical Fisher
            ``F = G^T G / n`` of the per-text gradients). ``λ`` is absolute, in ``F``'s units,
            whose eigenvalues vary by model and layer (36-2400 at layer 3 of the default model):
            ``λ`` far above them gives the plain ``grad`` direction back, far below them whitens
            along every gradient direction.
        concept: recorded in the metadata (default: the PairSet's concept).
        share_prefixes: compute token prefixes shared by several texts once (the chat template
            and persona turn of persona pairs, a suffix cut at several lengths, a CAA
            question) and reuse their KV cache (:mod:`steerkern.prefix_tree`); the same
            activations up to float summation order. ``False`` runs every text whole.

    Returns:
        :class:`~steerkern.vectors.SteeringVector` with one part per layer at ``target``.

    Example:
        >>> pairs = make_pairs(tokenizer, concept="sentiment")          # doctest: +SKIP
        >>> vector = extract(model, tokenizer, pairs, method="mean_diff")  # doctest: +SKIP
    """
    model_and_tokenizer(model, tokenizer)
    progress = flag(progress, "progress")
    if concept is not None and not isinstance(concept, str):
        raise TypeError(f"concept must be a name (a string) or None, got {concept!r}")
    pair_set = as_pairs(pairs, "pairs")
    if all(chosen == rejected for chosen, rejected in pair_set.pairs):  # exact, whatever the dtype
        raise ValueError("pairs: every chosen text is its rejected text, so there is no direction to "
                         "extract: give pairs that differ")
    plan = _plan(model, method, layers, rank, last_n_tokens, target, batch_size, readout_layer,
                 fisher_lambda, share_prefixes, read_token_index)
    _check_rows(plan, len(pair_set))
    shard = _Shard(pair_set, accelerator)
    with eval_mode(model):
        acts, inputs, grads = _read(model, tokenizer, plan, shard, progress and shard.rank == 0)
    parts = {(layer, target): _part(plan, layer, acts, inputs, grads) for layer in plan.layers}
    return SteeringVector(parts, _metadata(model, plan, pair_set, concept))


_callable_module(__name__)  # steerkern.extract(...) calls extract() even once this module is bound there
