"""Training a low-rank steering adapter with the inner contrastive loss (SPEC section 3).

The adapter has, per steered layer ``l``, an fp32 bias ``b_l [D]`` and a low-rank map
``A_l [D, R]``, ``B_l [D, R]``, applied through the differentiable steering operator
(:func:`steerkern.ops.steer`, via :class:`steerkern.control.SteeringBank`) to the module's output
``h`` at every token::

    h <- h + c * (b_l + B_l @ (A_l^T @ h))            c = +1 (toward chosen) or -1

One training step on a batch of ``B`` (chosen, rejected) pairs:

1. **Policy pass**, one forward of ``4B`` rows ``[cho | rej | cho | rej]`` with per-row
   coefficients ``[+1, +1, -1, -1]`` (``SteeringBank.set_batch``), left padded. Hooks read the
   loss layer's output at the last ``n_last`` positions and the final hidden state (the input of
   the output head; the forward stops there, so no ``[rows, T, V]`` logits are ever built).
2. **Coherence**: per-token log-probs of the chosen sequences at ``c = +1`` and of the rejected
   ones at ``c = -1``, ``steerkern.ops.token_logprobs(h_final, W_head, next_tokens)`` (fused,
   never ``[N, V]``), against the reference log-probs of the same tokens. ``W_head`` includes
   the constant factor some models apply to the head's output (Cohere's ``logit_scale``,
   Granite's ``1 / logits_scaling``), measured once on one text, and the logits are soft-capped
   as the model's config says (Gemma 2's ``final_logit_softcapping``; :mod:`steerkern.head`).
3. **Loss**: :func:`steerkern.loss.inner_contrastive_loss` with the reference (unsteered, frozen)
   loss-layer states and the frozen unit direction ``u``. By default its bounded form: the
   projection reward ``-m tanh(z / m)`` (``projection="tanh"``) of the shift
   ``z = c (s_pi - s_ref) / S``, with one data-level scale ``S = mean over all pairs of |s_ref|``
   (``scale="data"``), plus the bounded shift term (``shift_weight=1``). The SPEC form
   (``projection="linear"``, ``scale="pair"``, ``shift_weight=0``) is unbounded below: on the
   default model it drove the loss to -311 in 60 steps and the text to token salad
   (research_notes.md).

The reference quantities do not change during training (the model is frozen), so they are
computed once before the first step, without grad and with steering off: the loss-layer states
at the last ``n_last`` positions and the per-token log-probs of every text. ``u`` is their
``mean_diff`` at the loss layer, normalised: ``u = mean_{pairs, t}(h_cho - h_rej) / ||.||``, so
``s_ref > 0`` on average and ``u`` points toward *chosen*.

Model state: every parameter's ``requires_grad`` is set to False for the run and restored
afterwards, as is ``model.training``; every hook is removed, exceptions included. Nothing about
the model changes before the arguments, the pairs and their tokenisation have been checked.

Distributed (``accelerate``): every process draws the same global batch of
``batch_size * num_processes`` pairs (same seed) and trains on its own slice; gradients are
averaged across processes with ``accelerator.reduce`` before the (prepared) optimizer steps, so
every process holds the same adapter. The reference pass runs on every process over all pairs.
"""

from __future__ import annotations

import math

import torch

from steerkern.checks import count, flag, model_and_tokenizer, real
from steerkern.control import SteeringBank, first_tensor, whole_prompt_passes
from steerkern.data import as_pairs, pair_text_name
from steerkern.head import IGNORE, HeadLogits, StopAtHead, output_head
from steerkern.kvcache import positions_from_mask
from steerkern.loss import (
    PENALTY_KINDS,
    PROJECTIONS,
    SCALE_EPS,
    CoherenceInputs,
    inner_contrastive_loss,
)
from steerkern.models import (
    RESIDUAL,
    as_layer_list,
    check_layer,
    decoder_layers,
    default_layers,
    execution_device,
    hidden_size,
    input_device,
    model_id,
    model_type,
    module_weight,
    num_layers,
    residual_stream_index,
    resolve_module,
    set_training_flags,
    token_states,
)
from steerkern.tokens import check_fits_positions, short_repr, text_token_ids
from steerkern.vectors import SteeringVector

COHERENCE = "train_adapter's per-token coherence term"


# --- checks -------------------------------------------------------------------------------------


def _check_layers(model, layers, loss_layer) -> tuple[list[int], int]:
    if layers is None:
        layer_list = default_layers(model)
    else:
        layer_list = sorted({check_layer(model, layer, "layers") for layer in as_layer_list(layers)})
    if loss_layer is None:
        n = num_layers(model)
        loss = min(n - 1, max(layer_list) + max(1, n // 6))
    else:
        loss = check_layer(model, loss_layer, "loss_layer")
    if loss < max(layer_list):
        raise ValueError(
            f"loss_layer={loss} comes before the steered layer {max(layer_list)}: the loss is read "
            f"at or after every steered layer; use loss_layer >= {max(layer_list)} or steer shallower layers"
        )
    return layer_list, loss


def _output_width(model, module, target: str) -> int:
    if target == RESIDUAL:
        return hidden_size(model)
    try:
        return module_weight(module).shape[0]
    except ValueError:
        return hidden_size(model)


def _grad_flags(model) -> list[tuple[torch.nn.Module, str, bool]]:
    """``(module, name, requires_grad)`` of every parameter of ``model``, for
    :func:`_restore_grad_flags`. Kept by module and name, not by Parameter object: accelerate's
    offloading (``cpu_offload``, ``device_map`` entries "cpu"/"disk") puts a new Parameter into
    the module at every forward, copying the flag of the one it replaces."""
    return [(module, name, p.requires_grad) for module in model.modules()
            for name, p in module.named_parameters(recurse=False)]


def _restore_grad_flags(saved: list[tuple[torch.nn.Module, str, bool]]) -> None:
    """Set each saved ``requires_grad`` on the parameter the module holds under that name now."""
    for module, name, required in saved:
        param = module._parameters.get(name)
        if param is not None:
            param.requires_grad_(required)


# --- tokens -------------------------------------------------------------------------------------


def _encode(model, tokenizer, texts: list[str], n_last: int) -> list[list[int]]:
    """Token ids per text (:func:`steerkern.tokens.text_token_ids`, as extraction reads them);
    every text needs at least ``max(n_last, 2)`` tokens and must fit learned positions."""
    out = text_token_ids(tokenizer, texts)
    for i, (text, ids) in enumerate(zip(texts, out)):
        if len(ids) < max(n_last, 2):
            raise ValueError(
                f"{pair_text_name(i)} {short_repr(text, 60)} has {len(ids)} tokens, fewer than n_last={n_last} "
                "(or 2): lower n_last or give longer texts"
            )
    check_fits_positions(model, [len(ids) for ids in out], pair_text_name, fix="shorten the text")
    return out


def _left_pad(seqs: list[list[int]], pad_id: int, device):
    """``(ids [R, W], mask [R, W], positions [R, W], labels [R, W-1])``, padded on the left;
    ``labels[r, t]`` is the token after position ``t`` (``IGNORE`` where either is padding)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    positions = positions_from_mask(mask)
    valid = (mask[:, :-1] * mask[:, 1:]).bool()
    labels = torch.where(valid, ids[:, 1:], torch.full_like(ids[:, 1:], IGNORE))
    return ids.to(device), mask.to(device), positions.to(device), labels.to(device)


def _draw_batch(queue: list[int], n_pairs: int, size: int, generator) -> list[int]:
    """``size`` pair indices popped from the end of ``queue`` (the rest of a shuffled pass over
    the pairs), refilled with ``torch.randperm(n_pairs)`` when it runs out; updates ``queue``.

    Every pass visits each pair once. When a batch runs into the next pass, the pairs already in
    the batch come last in that pass, so that the batch holds ``size`` distinct pairs whenever
    ``size <= n_pairs`` (a pair drawn twice would weigh double in the batch's mean)."""
    picked: list[int] = []
    while len(picked) < size:
        if not queue:
            order = torch.randperm(n_pairs, generator=generator).tolist()
            taken = set(picked)
            queue[:] = [i for i in order if i in taken] + [i for i in order if i not in taken]
        picked.append(queue.pop())
    return picked


def _batch_scale(s_ref: torch.Tensor, picked: list[int]) -> float:
    """``scale="batch"``: ``S = mean_{b in picked} |s_ref[b]| + eps`` over the step's whole batch
    ``picked`` (every process's slice; ``s_ref [n_pairs]`` the reference separations, which every
    process holds for every pair), ``eps`` the loss's (:func:`~steerkern.loss.inner_contrastive_loss`).

    Passed to the loss as a number: the loss's own ``"batch"`` form would take the mean over this
    process's slice only, a divisor that differs between processes, so that the averaged gradient
    was not one process's on the same batch."""
    return float(s_ref[picked].abs().mean()) + SCALE_EPS


def _right_align(rows: list[torch.Tensor], width: int, fill: float) -> torch.Tensor:
    """Stack 1-D tensors right-aligned into ``[R, width]`` (left filled with ``fill``)."""
    out = torch.full((len(rows), width), fill, dtype=torch.float32)
    for r, values in enumerate(rows):
        out[r, width - values.shape[0]:] = values
    return out


# --- forward passes -----------------------------------------------------------------------------


class _Reader:
    """Hooks reading the loss layer's output (last ``n_last`` positions) and the output head's
    input (the final, normed hidden state); the head itself never runs.

    The loss layer's output is read as per-token states ``[B, T, D]``
    (:func:`steerkern.models.token_states`): for a model that keeps ``S`` parallel copies of the
    residual stream (Gemma 3n's AltUp, ``[S, B, T, D]``), the active copy, the one the steering
    bank adds to and extraction reads."""

    def __init__(self, model, loss_layer: int, n_last: int):
        self.model, self.n_last = model, n_last
        self.loss_module = decoder_layers(model)[loss_layer]
        self.stream = residual_stream_index(model)
        self.head = output_head(model, COHERENCE)
        self.logits: HeadLogits | None = None  # measured before the first pass (train_adapter)
        self.handles: list = []
        self.h_loss = self.h_final = None
        self.shape = None  # [B, T] of the pass being read (__call__)

    def attach(self):
        def read_loss(module, args, kwargs, output):
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            states = token_states(hidden, *self.shape, self.stream)
            if states is None:
                raise RuntimeError(
                    f"the loss layer's output {tuple(getattr(hidden, 'shape', ()))} is not the "
                    f"per-token states of the {tuple(self.shape)} batch")
            self.h_loss = states[:, -self.n_last:, :]

        def read_final(module, args):
            self.h_final = args[0]
            raise StopAtHead

        self.handles.append(self.loss_module.register_forward_hook(read_loss, with_kwargs=True))
        self.handles.append(self.head.register_forward_pre_hook(read_final))

    def detach(self):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.h_loss = self.h_final = None

    def __call__(self, ids, mask, positions):
        """Returns ``(h_loss [R, n_last, D], h_final [R, W, D])`` (model dtype)."""
        self.h_loss = self.h_final = None
        self.shape = tuple(ids.shape)
        try:
            self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
        except StopAtHead:
            pass
        if self.h_loss is None or self.h_final is None:
            raise RuntimeError("the forward pass did not reach the loss layer and the output head")
        if self.h_final.shape[1] != ids.shape[1]:
            raise RuntimeError(f"the output head saw {tuple(self.h_final.shape)} hidden states, not "
                               f"every position of the {tuple(ids.shape)} batch")
        return self.h_loss, self.h_final


@torch.no_grad()
def _reference(reader, ids_list, pad_id, device, batch_size, progress):
    """Per text: loss-layer states ``[n_last, D]`` and per-token log-probs ``[len - 1]`` (CPU, fp32)."""
    from tqdm.auto import tqdm

    h_ref, logp_ref = [None] * len(ids_list), [None] * len(ids_list)
    order = sorted(range(len(ids_list)), key=lambda i: len(ids_list[i]))
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for chunk in tqdm(chunks, desc="train: reference", disable=not progress, leave=False):
        ids, mask, positions, labels = _left_pad([ids_list[i] for i in chunk], pad_id, device)
        h_loss, h_final = reader(ids, mask, positions)
        logp = reader.logits.logprobs(h_final, labels).float().cpu()
        for row, index in enumerate(chunk):
            h_ref[index] = h_loss[row].float().cpu()
            logp_ref[index] = logp[row, -(len(ids_list[index]) - 1):]
    return h_ref, logp_ref


# --- the adapter --------------------------------------------------------------------------------


class _Adapter:
    """fp32 leaf parameters per layer, cast into the bank's site tensors before every pass."""

    def __init__(self, model, layer_list, target, rank, generator):
        self.params: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for layer in layer_list:
            module = resolve_module(model, layer, target)
            width = _output_width(model, module, target)
            device = execution_device(model, module)  # not 'meta' under accelerate's offloading
            bias = torch.zeros(width, dtype=torch.float32)
            A = torch.randn(width, rank, generator=generator, dtype=torch.float32) / math.sqrt(width)
            B = torch.zeros(width, rank, dtype=torch.float32)
            self.params[layer] = tuple(t.to(device).requires_grad_(True) for t in (bias, A, B))
        vector = SteeringVector.from_lowrank(
            {layer: tuple(t.detach().cpu() for t in p) for layer, p in self.params.items()},
            target=target)
        self.bank = SteeringBank(model, vector)
        by_module = {id(resolve_module(model, layer, target)): layer for layer in layer_list}
        self.site_layers = [by_module[id(site.module)] for site in self.bank.sites]

    def parameters(self) -> list[torch.Tensor]:
        return [t for p in self.params.values() for t in p]

    def load_into_bank(self) -> None:
        """``site.bias/A/B = params.to(site dtype)[None]``: differentiable casts, K = 1 entry."""
        for site, layer in zip(self.bank.sites, self.site_layers):
            bias, A, B = self.params[layer]
            dtype = site.B.dtype
            site.bias, site.A, site.B = bias.to(dtype)[None], A.to(dtype)[None], B.to(dtype)[None]

    def entries(self) -> dict:
        return {layer: tuple(t.detach().float().cpu().clone() for t in p)
                for layer, p in self.params.items()}


def _warn_if_the_group_is_larger(accelerator) -> None:
    """Warn when ``torch.distributed`` is initialised with more processes than the default
    ``Accelerator`` sees (a group started without accelerate's launcher environment): every
    process then trains on every pair alone, the same adapter repeated, where ``extract`` under
    the same group splits the pairs."""
    import warnings

    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return
    group = dist.get_world_size()
    if group > int(accelerator.num_processes):
        warnings.warn(
            f"train_adapter: torch.distributed has {group} processes but the default Accelerator sees "
            f"{accelerator.num_processes}, so every process trains on every pair by itself (the same "
            "adapter, computed on each): launch with `accelerate launch` / torchrun, or pass "
            "accelerator=Accelerator(...) made for the group", stacklevel=3)


def _forget_optimizer(accelerator, optimizer) -> None:
    """Take the adapter's optimizer, prepared for the run, off ``accelerator``'s list of prepared
    optimizers: left there, the caller's accelerator kept every run's adapter and AdamW state
    alive, saved them with ``save_state`` (``optimizer.bin``, ``optimizer_1.bin``, ...) and shifted
    the numbering of the caller's own optimizers, so that a checkpoint saved before a run no
    longer loaded into them."""
    prepared = getattr(accelerator, "_optimizers", None)
    if optimizer is not None and isinstance(prepared, list):
        prepared[:] = [o for o in prepared if o is not optimizer]


# --- public -------------------------------------------------------------------------------------


@torch.inference_mode(False)  # trains also when called under inference_mode() (as under no_grad())
def train_adapter(model, tokenizer, pairs, *, layers=None, loss_layer=None, rank: int = 4,
                  target: str = RESIDUAL, steps: int = 100, lr: float = 3e-3, batch_size: int = 4,
                  n_last: int = 4, tau: float = 0.5, kind: str = "log_barrier", kappa: float = 1.0,
                  order_weight: float = 0.0, weight_decay: float = 0.0,
                  projection: str = "tanh", scale: str = "data", saturation: float = 2.0,
                  shift_weight: float = 1.0, accelerator=None, progress: bool = True,
                  seed: int = 0) -> SteeringVector:
    """Train a low-rank steering adapter on contrast pairs with the inner contrastive loss.

    Args:
        model, tokenizer: a causal LM and its tokenizer (``steerkern.load_model``). The model is
            frozen for the run and left exactly as it was (weights, ``requires_grad``,
            ``training`` of every sub-module, no hooks), errors included.
        pairs: ``[(chosen, rejected), ...]``, ``(chosen_list, rejected_list)`` or a ``PairSet``;
            each text needs at least ``n_last`` tokens.
        layers: steered layer(s) (default: ``steerkern.models.default_layers``, a middle band).
        loss_layer: layer whose output the loss reads, ``>= max(layers)`` (default
            ``min(n_layers - 1, max(layers) + max(1, n_layers // 6))``).
        rank: rank ``R >= 1`` of each layer's ``B A^T`` (up to 64, the operator's limit).
        target: steered module, ``"residual"`` (decoder layer output) or a sub-module name
            whose output is steered (``"mlp.down_proj"``, ...; source = its output).
        steps, lr, batch_size: optimisation (AdamW; ``batch_size`` pairs per process per step,
            at most the pairs shared among the processes; the metadata records the value used).
        n_last: last positions of each text read by the projection term.
        tau, kind, kappa: the per-token coherence penalty (``steerkern.loss.coherence_penalty``).
        order_weight: weight of the optional monotonic ordering term (0: off).
        projection: ``"tanh"`` (default, bounded: the reward for the shift along ``u`` saturates
            at ``saturation`` units of ``scale``) or ``"linear"`` (SPEC section 3 as written,
            unbounded below: it drove the adapter to token salad on the default model). See
            ``steerkern.loss.projection_loss``.
        scale: divisor of the projection term: ``"data"`` (default: ``mean |s_ref|`` over every
            training pair, computed once from the reference pass, so every step optimises the same
            objective), ``"batch"`` (mean ``|s_ref|`` of the step's pairs) or ``"pair"`` (SPEC:
            ``|s_ref[b]| + 1e-6`` per pair).
        saturation: ``m`` of the tanh projection, in units of the scale.
        shift_weight: weight of the shift term (``steerkern.loss.inner_contrastive_loss``: a
            bounded reward for moving *both* texts of a pair along ``c * u``, which the
            difference-only projection term cannot ask for). Default 1: on the default model
            (sentiment, layers 10 and 12, 30 steps; research_notes.md) it raised the score shift
            toward *chosen* at ΔNLL <= 0.1 from +0.27 to +0.48 nats (+0.20 ± 0.13, paired) and
            brought the *rejected* side level with pca_diff; 0 gives the SPEC terms alone.
        weight_decay: AdamW weight decay on the adapter.
        accelerator: an ``accelerate.Accelerator`` (default: a new one); the optimizer is
            prepared with it and gradients are averaged across its processes. The default one
            sees the processes of ``accelerate launch`` / torchrun; inside a ``torch.distributed``
            group started otherwise it sees one, and a warning says every process trains alone.
        progress: tqdm progress bars (main process only); True or False.
        seed: initialisation of ``A`` and the order of the pairs; an int in ``[-2**63, 2**64)``.

    Returns:
        ``SteeringVector`` with a ``(bias [D], A [D, R], B [D, R])`` part per layer at ``target``;
        coefficient +1 moves toward *chosen*. Metadata: ``method="trained_adapter"``,
        ``loss_layer``, ``steps``, ``final_loss`` (mean of the last ``min(10, steps)`` steps),
        ``loss_history`` (per step), ``rank``, ``tau``, ``kind``, ``kappa``, ``n_last``, ``lr``,
        ``batch_size`` (per process), ``num_processes`` (a step's batch is ``batch_size *
        num_processes`` pairs), ``concept``, ``projection``, ``scale`` (the value used when ``"data"``),
        ``saturation``, ``shift_weight``, ``terms_history`` (per step, this process's batch:
        ``proj_pos``, ``proj_neg``, ``coh_pos``, ``coh_neg``, ``order``, ``shift``).

    Example:
        >>> vector = train_adapter(model, tokenizer, concept_pairs("sentiment", tokenizer),
        ...                        layers=[10, 12], steps=50)                  # doctest: +SKIP
        >>> with steer(model, vector, coeff=1.0): ...                         # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    # 1. every check, before anything about the model changes
    model_and_tokenizer(model, tokenizer)
    rank = count(rank, "rank")
    if rank > 64:
        raise ValueError(f"rank must be at most 64 (the steering operator's limit), got {rank}")
    steps = count(steps, "steps")
    batch_size = count(batch_size, "batch_size")
    n_last = count(n_last, "n_last")
    lr = real(lr, "lr", positive=True)
    tau = real(tau, "tau", non_negative=True)
    kappa = real(kappa, "kappa", positive=True)
    order_weight = real(order_weight, "order_weight", non_negative=True)
    weight_decay = real(weight_decay, "weight_decay", non_negative=True)
    seed = count(seed, "seed", minimum=None)
    if not -2**63 <= seed < 2**64:  # torch.Generator.manual_seed's range, checked before any pass
        raise ValueError(f"seed must be an int in [-2**63, 2**64) (a torch.Generator seed), got {seed}: "
                         "reduce it, e.g. seed % 2**64")
    progress = flag(progress, "progress")
    needs = ("num_processes", "process_index", "prepare", "backward")
    if accelerator is not None and not all(hasattr(accelerator, name) for name in needs):
        raise TypeError(f"accelerator must be an accelerate.Accelerator (with {', '.join(needs)}) or None, "
                        f"got {type(accelerator).__name__}")
    if kind not in PENALTY_KINDS:
        raise ValueError(f"kind must be one of {PENALTY_KINDS}, got {kind!r}")
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    if scale not in ("data", "batch", "pair"):
        raise ValueError(f"scale must be 'data', 'batch' or 'pair', got {scale!r}")
    saturation = real(saturation, "saturation", positive=True)
    shift_weight = real(shift_weight, "shift_weight", non_negative=True)
    pair_set = as_pairs(pairs, "pairs")
    layer_list, loss_at = _check_layers(model, layers, loss_layer)
    for layer in layer_list:  # raises naming target
        first_tensor(resolve_module(model, layer, target), f"layer {layer}, target {target!r}")
    output_head(model, COHERENCE)  # a model without a usable head fails here, before any work
    texts = [text for pair in pair_set.pairs for text in pair]
    ids_list = _encode(model, tokenizer, texts, n_last)
    pad_id = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else (
        getattr(tokenizer, "eos_token_id", None) or 0)
    if accelerator is None:
        from accelerate import Accelerator

        accelerator = Accelerator()
        _warn_if_the_group_is_larger(accelerator)
    if int(getattr(accelerator, "gradient_accumulation_steps", 1) or 1) > 1:
        raise ValueError(
            f"accelerator has gradient_accumulation_steps={accelerator.gradient_accumulation_steps}, "
            "but train_adapter takes an optimizer step per batch: raise batch_size instead"
        )
    world, rank_index = int(accelerator.num_processes), int(accelerator.process_index)
    show = bool(progress) and rank_index == 0
    device = input_device(model)
    n_pairs = len(pair_set)
    # a step draws at most every pair once over the processes: a larger batch only repeated some
    batch_size = min(batch_size, max(1, n_pairs // world))

    # 2. freeze (restored in finally), reference pass, train
    saved_flags = _grad_flags(model)
    saved_modes = [(m, m.training) for m in model.modules()]
    reader = _Reader(model, loss_at, n_last)
    adapter = optimizer = None
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        set_training_flags(model, False)
        shortest = min(ids_list, key=len)
        scale_ids, scale_mask, scale_pos, _ = _left_pad([shortest], pad_id, device)
        reader.logits = HeadLogits.measure(model, reader.head, scale_ids, scale_mask, scale_pos)
        reader.attach()
        h_ref, logp_ref = _reference(reader, ids_list, pad_id, device, 4 * batch_size, show)
        reader.detach()
        diffs = torch.stack([h_ref[2 * i] - h_ref[2 * i + 1] for i in range(n_pairs)])
        mean_diff = diffs.reshape(-1, diffs.shape[-1]).mean(0)
        norm = float(mean_diff.norm())
        if not norm > 0:
            raise ValueError("pairs: chosen and rejected texts give the same loss-layer states on "
                             "average, so there is no direction to train toward")
        u = (mean_diff / norm).to(device)
        s_ref = (diffs @ (mean_diff / norm)).mean(1)  # [n_pairs]: mean_t (h_cho - h_rej)[b, t] . u
        loss_scale = scale
        if scale == "data":
            loss_scale = float(s_ref.abs().mean())  # S = mean over every pair of |s_ref[b]|
            if not loss_scale > 0:
                raise ValueError("pairs: the reference separation along u is 0 for every pair")

        generator = torch.Generator().manual_seed(seed)
        adapter = _Adapter(model, layer_list, target, rank, generator)
        optimizer = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=weight_decay)
        optimizer = accelerator.prepare(optimizer)

        history: list[float] = []
        term_names = ("proj_pos", "proj_neg", "coh_pos", "coh_neg", "order", "shift")
        terms_history: dict[str, list[float]] = {name: [] for name in term_names}
        queue: list[int] = []
        global_batch = batch_size * world
        with adapter.bank.attached(), torch.enable_grad(), whole_prompt_passes(model):  # also under no_grad()
            reader.attach()
            bar = tqdm(range(steps), desc="train_adapter", disable=not show)
            for _ in bar:
                picked = _draw_batch(queue, n_pairs, global_batch, generator)
                mine = picked[rank_index::world]
                adapter.load_into_bank()
                loss_terms = _step(reader, adapter.bank, ids_list, h_ref, logp_ref, mine,
                                   pad_id, device, u, n_last=n_last, tau=tau, kind=kind,
                                   kappa=kappa, order_weight=order_weight,
                                   projection=projection,
                                   scale=_batch_scale(s_ref, picked) if scale == "batch" else loss_scale,
                                   saturation=saturation, shift_weight=shift_weight)
                if not loss_terms.loss.requires_grad:
                    raise ValueError(
                        f"target {target!r}: the loss at layer {loss_at} does not depend on the steered "
                        "module's output (the model discards it), so the adapter cannot learn: steer a "
                        "module whose output the model uses, or the residual stream")
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(loss_terms.loss)
                if world > 1:
                    for t in adapter.parameters():
                        if t.grad is None:
                            t.grad = torch.zeros_like(t)
                        t.grad = accelerator.reduce(t.grad, reduction="mean")
                optimizer.step()
                value = float(loss_terms.loss.detach())
                if world > 1:
                    value = float(accelerator.reduce(loss_terms.loss.detach().reshape(1),
                                                     reduction="mean"))
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"train_adapter: the loss became {value} at step {len(history)}: lower lr")
                history.append(value)
                for name in term_names:
                    terms_history[name].append(round(float(getattr(loss_terms, name).detach()), 6))
                if show:
                    terms = loss_terms._replace(loss=loss_terms.loss.detach())
                    bar.set_postfix(loss=f"{value:.3f}", proj=f"{float(terms.proj_pos.detach()):.2f}",
                                    coh=f"{float((terms.coh_pos + terms.coh_neg).detach()):.3f}")
    finally:
        reader.detach()
        if adapter is not None:
            adapter.bank.detach()
        _forget_optimizer(accelerator, optimizer)
        _restore_grad_flags(saved_flags)
        for module, mode in saved_modes:
            module.training = mode

    tail = history[-min(10, len(history)):]
    return SteeringVector.from_lowrank(
        adapter.entries(), target=target, source="output",
        model=model_id(model),
        model_type=model_type(model),
        hidden_size=hidden_size(model), method="trained_adapter", concept=pair_set.concept,
        loss_layer=loss_at, steps=steps, final_loss=sum(tail) / len(tail),
        loss_history=[round(v, 6) for v in history], rank=rank, tau=tau, kind=kind, kappa=kappa,
        n_last=n_last, lr=lr, batch_size=batch_size, num_processes=world, n_pairs=n_pairs,
        projection=projection, scale=loss_scale, saturation=saturation, shift_weight=shift_weight,
        terms_history=terms_history,
    )


def _step(reader, bank, ids_list, h_ref, logp_ref, batch, pad_id, device, u, **loss_args):
    """Policy pass on rows ``[cho | rej | cho | rej]`` with coefficients ``[+1, +1, -1, -1]``;
    returns the :class:`~steerkern.loss.ContrastiveLoss` of the batch. The loss is formed on the
    loss layer's device: on a model split by ``device_map`` the inputs (``device``), the loss
    layer and the head may sit on three devices."""
    n = len(batch)
    cho = [ids_list[2 * i] for i in batch]
    rej = [ids_list[2 * i + 1] for i in batch]
    ids, mask, positions, labels = _left_pad(cho + rej + cho + rej, pad_id, device)
    bank.set_batch(coeff=[1.0] * (2 * n) + [-1.0] * (2 * n))
    h_loss, h_final = reader(ids, mask, positions)
    h_loss = h_loss.float()
    at = h_loss.device
    width = labels.shape[1]
    # coherence: chosen rows at c = +1 (rows 0..n-1), rejected rows at c = -1 (rows 3n..4n-1)
    logp_pos = reader.logits.logprobs(h_final[:n], labels[:n]).to(at)
    logp_neg = reader.logits.logprobs(h_final[3 * n:], labels[3 * n:]).to(at)
    ref_pos = _right_align([logp_ref[2 * i] for i in batch], width, 0.0).to(at)
    ref_neg = _right_align([logp_ref[2 * i + 1] for i in batch], width, 0.0).to(at)
    ref_states = (torch.stack([h_ref[2 * i] for i in batch]).to(at),
                  torch.stack([h_ref[2 * i + 1] for i in batch]).to(at))
    labels = labels.to(at)
    return inner_contrastive_loss(
        (h_loss[:n], h_loss[n:2 * n]), (h_loss[2 * n:3 * n], h_loss[3 * n:]), ref_states, u,
        coherence_pos=CoherenceInputs(logp_pos, ref_pos, labels[:n] != IGNORE),
        coherence_neg=CoherenceInputs(logp_neg, ref_neg, labels[3 * n:] != IGNORE),
        **loss_args,
    )
