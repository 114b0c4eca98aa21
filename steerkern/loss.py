"""Training losses for steering (SPEC sections 2 and 3).

- ``coherence_penalty``: the per-token coherence penalty, the one place its maths lives.
- ``sequence_penalty``: that penalty reduced per token / per sequence / per batch.
- ``margin_loss``: the fused margin loss from hidden states, never holding ``[N, V]`` logits.
- ``inner_contrastive_loss``: the representation-level contrastive loss with its coherence terms;
  the SPEC form by default, and a bounded form (``projection="tanh"``, a shared ``scale``, an
  optional ``shift_weight`` term) that ``train_adapter`` uses (``projection_loss`` has the maths).

Penalty, with ``d[n] = logp_ref[n] - logp_pi[n]`` (how much worse the steered policy predicts
token n than the reference) and margin ``tau``::

    log_barrier (default):  kappa * log(1 + relu(d - tau))
    hinge:                  relu(d - tau)
    squared_hinge:          relu(d - tau)^2

It is per token on purpose: a sequence-level mean would let a policy pay for a few badly
predicted tokens by making frequent ones very likely.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from steerkern import ops
from steerkern.checks import count, real, with_data

PENALTY_KINDS = ("log_barrier", "hinge", "squared_hinge")
REDUCTIONS = ("none", "mean", "sum")
SCALE_EPS = 1e-6  # added to the projection terms' divisor S (keeps |s_ref| = 0 finite)


def _batch_mean(x: torch.Tensor) -> torch.Tensor:
    """``x [B] -> mean_b x[b]``, a scalar; 0 (with a zero gradient) for ``B = 0``, not the NaN of
    an empty mean (a filtered-out micro-batch, an uneven shard)."""
    return x.sum() / max(x.shape[0], 1)


def coherence_penalty(
    d: torch.Tensor, kind: str = "log_barrier", tau: float = 0.5, kappa: float = 1.0
) -> torch.Tensor:
    """Elementwise coherence penalty of the log-prob drop ``d = logp_ref - logp_pi``.

    ``log_barrier``: ``kappa * log(1 + relu(d - tau))``; ``hinge``: ``relu(d - tau)``;
    ``squared_hinge``: ``relu(d - tau)^2``. Zero, with zero gradient, wherever ``d <= tau``.
    Returns a tensor of ``d``'s shape and dtype.
    """
    tau, kappa = _check_penalty_args(kind, tau, kappa)
    excess = torch.relu(d - tau)
    if kind == "log_barrier":
        return kappa * torch.log1p(excess)
    if kind == "hinge":
        return excess
    return excess * excess


def _check_penalty_args(kind, tau, kappa):
    if kind not in PENALTY_KINDS:
        raise ValueError(f"kind must be one of {PENALTY_KINDS}, got {kind!r}")
    return (real(tau, "tau", non_negative=True, meaning=" (a margin in nats)"),
            real(kappa, "kappa", positive=True))


def _as_mask(mask: torch.Tensor | None, like: torch.Tensor, name: str) -> torch.Tensor:
    if mask is None:
        return torch.ones(like.shape, dtype=torch.bool, device=like.device)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of 0/1 or bool, got {type(mask).__name__}")
    with_data(mask, name)
    if tuple(mask.shape) != tuple(like.shape):
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(like.shape)}")
    if mask.dtype != torch.bool:
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(
                f"{name} must hold only 0 and 1 (it selects tokens, it does not weight them)"
            )
        mask = mask != 0
    return mask.to(like.device)


def sequence_penalty(
    logp_pi: torch.Tensor,
    logp_ref: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    tau: float = 0.5,
    kind: str = "log_barrier",
    kappa: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Coherence penalty of per-token log-probs, reduced.

    Args:
        logp_pi: policy log-probs ``[N]`` (one sequence) or ``[B, T]`` (a batch), differentiable.
        logp_ref: reference log-probs, same shape (treated as given; detach it if it is fixed).
        mask: tokens that count, same shape, bool or 0/1 (default: all).
        reduction: ``"none"``: per-token penalty, 0 on masked-out tokens; ``"mean"``: ``[N]`` ->
            mean over the masked tokens, ``[B, T]`` -> mean over each sequence's masked tokens
            (0 for a sequence with none), then over the B sequences; ``"sum"``: sum over masked
            tokens.

    Masked-out tokens contribute nothing to the value or the gradient, whatever their
    ``logp_ref`` holds (NaN included). The drop ``d`` and the result are fp32 (float64 for a
    float64 ``logp_pi``), whatever the log-probs' dtype.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    for name, value in (("logp_pi", logp_pi), ("logp_ref", logp_ref)):
        if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
            raise TypeError(
                f"{name} must be a floating-point tensor of per-token log-probs, got "
                f"{getattr(value, 'dtype', type(value).__name__)}"
            )
        with_data(value, name)
    if tuple(logp_ref.shape) != tuple(logp_pi.shape):
        raise ValueError(
            f"logp_ref has shape {tuple(logp_ref.shape)} but logp_pi has {tuple(logp_pi.shape)}"
        )
    if logp_pi.dim() not in (1, 2):
        raise ValueError(f"log-probs must be [N] or [B, T], got {tuple(logp_pi.shape)}")
    mask = _as_mask(mask, logp_pi, "mask")
    # d in fp32 at least: a bf16 logp_pi would round logp_ref by up to 0.06 nats near -20
    acc = torch.promote_types(logp_pi.dtype, torch.float32)
    d = logp_ref.to(acc) - logp_pi.to(acc)
    zero = torch.zeros((), dtype=acc, device=logp_pi.device)
    per_token = torch.where(
        mask, coherence_penalty(torch.where(mask, d, zero), kind, tau, kappa), zero
    )
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    counts = mask.sum(dim=-1)
    per_seq = per_token.sum(dim=-1) / counts.clamp(min=1)
    if per_seq.dim() == 0:
        return per_seq
    return _batch_mean(per_seq)


def margin_loss(
    h_pi: torch.Tensor,
    W: torch.Tensor,
    labels: torch.Tensor,
    logp_ref: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    tau: float = 0.5,
    kind: str = "log_barrier",
    kappa: float = 1.0,
    reduction: str = "mean",
    ignore_index: int = -100,
    softcap: float | None = None,
) -> torch.Tensor:
    """Fused margin loss: the coherence penalty of the policy's per-token log-probs.

    ``logp_pi = token_logprobs(h_pi, W, labels, softcap=softcap)`` (fused, never ``[N, V]``), then
    ``sequence_penalty(logp_pi, logp_ref, mask)``. Masked-out tokens are sent to the kernel as
    ``ignore_index`` and cost nothing; in the backward only tokens whose penalty is active
    (``d > tau``) recompute logits, since every other token's upstream gradient is exactly 0.

    Args:
        h_pi: policy hidden states before the head, ``[N, D]`` (one sequence) or ``[B, T, D]``.
        W: output head ``[V, D]`` (gets a gradient only if it requires one).
        labels: next-token ids ``[N]`` / ``[B, T]``; ``ignore_index`` entries count as masked.
        logp_ref: reference log-probs of the same tokens, ``[N]`` / ``[B, T]``.
        mask: tokens that count (bool or 0/1), ``[N]`` / ``[B, T]``; default: labels != ignore_index.
        tau, kind, kappa: see ``coherence_penalty``.
        reduction: ``"none"`` (per token), ``"mean"`` (see ``sequence_penalty``) or ``"sum"``.
        softcap: the model's logit soft-cap ``c`` (logits ``c tanh(W h / c)``, Gemma 2), or
            ``None``; see ``steerkern.ops.token_logprobs``.

    Returns:
        Per-token ``[N]`` / ``[B, T]`` penalty, or a scalar; fp32 (float64 for float64 ``h_pi``).
    """
    if not isinstance(h_pi, torch.Tensor) or h_pi.dim() not in (2, 3):
        raise ValueError(
            f"h_pi must be policy hidden states [N, D] or [B, T, D], got "
            f"{tuple(h_pi.shape) if isinstance(h_pi, torch.Tensor) else type(h_pi).__name__}"
        )
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(h_pi.shape[:-1]):
        raise ValueError(
            f"labels must have h_pi's leading shape {tuple(h_pi.shape[:-1])}, got "
            f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}"
        )
    if not isinstance(logp_ref, torch.Tensor) or tuple(logp_ref.shape) != tuple(labels.shape):
        raise ValueError(
            f"logp_ref must have labels' shape {tuple(labels.shape)}, got "
            f"{tuple(logp_ref.shape) if isinstance(logp_ref, torch.Tensor) else type(logp_ref).__name__}"
        )
    tau, kappa = _check_penalty_args(kind, tau, kappa)
    ignore_index = count(ignore_index, "ignore_index", minimum=None)
    mask = _as_mask(mask, labels, "mask") & (labels != ignore_index)
    masked_labels = torch.where(mask, labels, torch.full_like(labels, ignore_index))
    logp_pi = ops.token_logprobs(h_pi, W, masked_labels, ignore_index=ignore_index, softcap=softcap)
    return sequence_penalty(
        logp_pi, logp_ref, mask, tau=tau, kind=kind, kappa=kappa, reduction=reduction
    )


@dataclass
class CoherenceInputs:
    """Per-token log-probs of the sequences whose coherence a steering sign must keep.

    logp_pi: policy (steered) log-probs ``[B, L]``, differentiable (e.g. from
        ``steerkern.ops.token_logprobs``, which never builds ``[B, L, V]`` logits).
    logp_ref: reference (unsteered) log-probs ``[B, L]``.
    mask: tokens that count ``[B, L]`` (bool or 0/1); None = all.
    """

    logp_pi: torch.Tensor
    logp_ref: torch.Tensor
    mask: torch.Tensor | None = None


class ContrastiveLoss(NamedTuple):
    """``loss`` (scalar, to backpropagate) and its batch-mean terms (scalars, for logging)."""

    loss: torch.Tensor
    proj_pos: torch.Tensor  # mean_b L_proj(+1)
    proj_neg: torch.Tensor  # mean_b L_proj(-1)
    coh_pos: torch.Tensor  # mean_b L_coh(+1), on chosen sequences
    coh_neg: torch.Tensor  # mean_b L_coh(-1), on rejected sequences
    order: torch.Tensor  # mean_b ordering hinge (0 when order_weight == 0)
    shift: torch.Tensor | None = None  # mean_b [L_shift(+1) + L_shift(-1)] (0 when shift_weight == 0)


def _last_tokens(h: torch.Tensor, n_last: int, name: str, attention_mask) -> torch.Tensor:
    if not isinstance(h, torch.Tensor) or h.dim() != 3:
        raise ValueError(
            f"{name} must be [B, T, D] hidden states, got "
            f"{tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__}"
        )
    if h.shape[1] < n_last:
        raise ValueError(f"{name} has {h.shape[1]} positions, fewer than n_last={n_last}")
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(h.shape[:2]):
            raise ValueError(
                f"attention mask for {name} must be {tuple(h.shape[:2])}, "
                f"got {tuple(attention_mask.shape)}"
            )
        if not bool((attention_mask[:, -n_last:] != 0).all()):
            raise ValueError(
                f"the last n_last={n_last} positions of {name} include padding: pad on the left "
                "(tokenizer.padding_side = 'left') or lower n_last"
            )
    return h[:, -n_last:, :]


def projection_scores(
    h_cho: torch.Tensor,
    h_rej: torch.Tensor,
    u: torch.Tensor,
    n_last: int = 1,
    mask_cho: torch.Tensor | None = None,
    mask_rej: torch.Tensor | None = None,
) -> torch.Tensor:
    """``s[b] = mean_t (h_cho[b, t] - h_rej[b, t]) . u`` over the last ``n_last`` positions.

    h_cho, h_rej: ``[B, T_cho, D]``, ``[B, T_rej, D]`` aligned from the right (left padding);
    u: ``[D]``; mask_cho / mask_rej: optional attention masks ``[B, T]`` used to check that the
    read positions are real tokens. Returns ``[B]``.
    """
    n_last = count(n_last, "n_last")
    a = _last_tokens(h_cho, n_last, "h_cho", mask_cho)
    b = _last_tokens(h_rej, n_last, "h_rej", mask_rej)
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise ValueError(
            f"chosen {tuple(h_cho.shape)} and rejected {tuple(h_rej.shape)} states "
            "must share batch size B and hidden size D"
        )
    if not isinstance(u, torch.Tensor) or u.shape != (a.shape[2],):
        got = tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__
        raise ValueError(f"u must be a [D] = [{a.shape[2]}] tensor, got {got}")
    # fp32 accumulation (float64 stays): in bf16, s_pi - s_ref would cancel to a few bits. A
    # product and a sum, not ``@``, which autocast would run in bf16/fp16 inside its block.
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    diff = a.to(acc) - b.to(acc)
    return (diff * u.to(device=a.device, dtype=acc)).sum(dim=-1).mean(dim=1)


PROJECTIONS = ("linear", "tanh")


def _pair_scale(s_ref: torch.Tensor, scale, eps: float) -> torch.Tensor:
    """The divisor ``S`` of the projection terms, ``[B]`` (broadcast from a scalar where shared).

    ``"pair"``: ``|s_ref[b]| + eps`` (SPEC section 3); ``"batch"``: ``mean_b |s_ref[b]| + eps``,
    the same for every pair of the batch; a positive float: that constant (a data-level scale,
    e.g. the mean ``|s_ref|`` over the whole training set). Autograd differentiates ``S``
    through ``s_ref`` in the pair and batch forms (in training ``s_ref`` is a constant anyway).
    """
    if isinstance(scale, str):
        if scale == "pair":
            return s_ref.abs() + eps
        if scale == "batch":
            return (s_ref.abs().mean() + eps).expand_as(s_ref)
        raise ValueError(f"scale must be 'pair', 'batch' or a positive number, got {scale!r}")
    return torch.full_like(s_ref, real(scale, "scale", positive=True, meaning=" (or 'pair', 'batch')"))


def projection_loss(
    s_pi: torch.Tensor,
    s_ref: torch.Tensor,
    c: int,
    eps: float = SCALE_EPS,
    *,
    projection: str = "linear",
    scale="pair",
    saturation: float = 2.0,
) -> torch.Tensor:
    """``mean_b L_proj(c)`` for ``c`` in {+1, -1}; ``s_pi``, ``s_ref``: ``[B]``; returns a scalar.

    With ``S[b]`` from ``scale`` (``"pair"``: ``|s_ref[b]| + eps``; ``"batch"``:
    ``mean_b |s_ref| + eps``; a float: that constant) and the normalised shift toward the side
    ``c`` asks for, ``z[b] = c * (s_pi[b] - s_ref[b]) / S[b]``::

        linear (SPEC section 3):  L_proj(c) = -c * s_pi / S          (= -z - c * s_ref / S)
        tanh:                     L_proj(c) = -m * tanh(z / m)       m = saturation > 0

    ``linear`` is unbounded below: it falls linearly in the adapter's gain while the per-token
    coherence penalty grows only logarithmically (log_barrier) or quadratically in the per-token
    log-prob drop, which itself saturates once the text is garbage, so its minimum sits at
    infinite gain (measured: loss -311 after 60 steps, token salad). ``tanh`` has the same
    value and slope as ``linear`` at the reference (``dL/dz = -1`` at ``z = 0``; the constant
    ``c * s_ref / S`` is dropped, so ``L_proj = 0`` there), but ``-m < L_proj < 0`` for
    ``z > 0`` and ``dL/dz = -sech^2(z/m)`` decays like ``4 exp(-2z/m)``: the reward is worth at
    most ``m`` (a shift of about ``m`` reference separations), so any coherence cost above
    that stops the optimiser at a finite gain. Gradient:
    ``dL/ds_pi[b] = -(c / S[b]) * sech^2(z[b] / m) / B``.

    The sign comes from ``c`` alone: nothing here looks at the sign of ``s_pi`` or ``s_ref``.
    """
    if c not in (1, -1):
        raise ValueError(f"c must be +1 or -1, got {c!r}")
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    saturation = real(saturation, "saturation", positive=True)
    if s_pi.dim() != 1 or s_ref.shape != s_pi.shape:
        raise ValueError(f"s_pi and s_ref must both be [B], got {tuple(s_pi.shape)} and "
                         f"{tuple(s_ref.shape)} (a [B, 1] s_ref would broadcast to [B, B])")
    S = _pair_scale(s_ref, scale, eps)
    if projection == "linear":
        return _batch_mean(-c * s_pi / S)
    z = c * (s_pi - s_ref) / S
    return _batch_mean(-saturation * torch.tanh(z / saturation))


def inner_contrastive_loss(
    pi_pos: tuple[torch.Tensor, torch.Tensor],
    pi_neg: tuple[torch.Tensor, torch.Tensor],
    ref: tuple[torch.Tensor, torch.Tensor],
    u: torch.Tensor,
    *,
    coherence_pos: CoherenceInputs | None = None,
    coherence_neg: CoherenceInputs | None = None,
    n_last: int = 1,
    attention_mask: tuple[torch.Tensor, torch.Tensor] | None = None,
    eps: float = SCALE_EPS,
    tau: float = 0.5,
    kind: str = "log_barrier",
    kappa: float = 1.0,
    order_weight: float = 0.0,
    order_margin: float = 0.0,
    projection: str = "linear",
    scale="pair",
    saturation: float = 2.0,
    shift_weight: float = 0.0,
) -> ContrastiveLoss:
    """Inner contrastive loss of SPEC section 3, for steering coefficients c = +1 and c = -1.

    The defaults (``projection="linear"``, ``scale="pair"``) are the SPEC formula exactly;
    ``projection="tanh"`` with a ``"batch"`` or data-level ``scale`` is the bounded variant that
    ``steerkern.train_adapter`` uses by default (see ``projection_loss`` for why).

    Args:
        pi_pos: ``(h_cho, h_rej)`` policy hidden states at the loss layer under c = +1, each
            ``[B, T, D]`` (T may differ between the two), aligned from the right (left padding).
        pi_neg: the same under c = -1.
        ref: the same for the reference (unsteered, frozen) model.
        u: frozen unit preference direction ``[D]`` (from the reference; points to *chosen*).
        coherence_pos: per-token log-probs of the chosen sequences under c = +1 (None: no term).
        coherence_neg: per-token log-probs of the rejected sequences under c = -1.
        n_last: number of last positions read.
        attention_mask: optional ``(mask_cho, mask_rej)`` ``[B, T]`` to check no pad is read.
        eps: added to ``|s_ref|`` (pair and batch scales).
        tau, kind, kappa: the coherence penalty (``coherence_penalty``).
        order_weight, order_margin: optional monotonic ordering term (below).
        projection: ``"linear"`` (SPEC, unbounded below) or ``"tanh"`` (bounded by
            ``saturation``).
        scale: the divisor ``S`` of the projection and ordering terms: ``"pair"`` (SPEC,
            ``|s_ref[b]| + eps``), ``"batch"`` (``mean_b |s_ref[b]| + eps``) or a positive float
            (a data-level constant, e.g. the mean ``|s_ref|`` over the training set).
        saturation: ``m`` of the tanh projection, in units of ``S`` (ignored for linear).
        shift_weight: weight of the optional shift term (below; 0: off, the SPEC loss).

    Why not per pair: ``1 / (|s_ref[b]| + eps)`` weights a pair whose reference separation is
    near 0 by up to ``1 / eps = 1e6``, and it flips the meaning of "a unit shift" from pair to
    pair. With a shared ``S`` every pair's shift is measured in the same unit, the weight of a
    pair is bounded, and with a data-level constant (not recomputed per batch) the minibatch loss
    is an unbiased estimate of the full-data loss (a batch mean in the denominator is not).

    Maths (per pair b; ``u`` fixed, ``c`` fixed — the sign is never flipped to the easier side)::

        s_pi(c) = mean_t (h_pi(c)[cho, t] - h_pi(c)[rej, t]) . u      s_ref likewise from ref
        z(c) = c * (s_pi(c) - s_ref) / S
        L_proj(c) = -c * s_pi(c) / S           (linear)    or    -m * tanh(z(c) / m)   (tanh)
        L_coh(+1) = mean over masked tokens of penalty(logp_ref - logp_pi) on chosen sequences,
        L_coh(-1) the same on rejected sequences
        L_order = relu(m_o - (s_pi(+1) - s_ref) / S)
                + relu(m_o - (s_ref - s_pi(-1)) / S)       (requires s_pi(+1) > s_ref > s_pi(-1))
        e(c) = (mean_t (h_pi(c)[cho, t] - h_ref[cho, t]) . u
                + mean_t (h_pi(c)[rej, t] - h_ref[rej, t]) . u) / 2
        L_shift(c) = -c * e(c) / S             (linear)    or    -m * tanh(c * e(c) / (m S))
        loss = mean_b[L_proj(+1) + L_coh(+1)] + mean_b[L_proj(-1) + L_coh(-1)]
               + order_weight * mean_b[L_order] + shift_weight * mean_b[L_shift(+1) + L_shift(-1)]

    The shift term: ``L_proj`` reads only the chosen-minus-rejected *difference*, which a steering
    bias added to both texts leaves unchanged (exactly so at the steered layer), so ``L_proj``
    trains the low-rank map to amplify (c = +1) or reverse (c = -1) the difference a text already
    has, and gives the bias no gradient of its own. ``L_shift`` rewards moving *both* texts along
    ``c * u`` relative to the reference, what an extracted additive vector does; with ``tanh`` it
    is bounded by ``m`` like ``L_proj``.

    Returns:
        ``ContrastiveLoss(loss, proj_pos, proj_neg, coh_pos, coh_neg, order, shift)``, all scalars.
    """
    n_last = count(n_last, "n_last")
    eps = real(eps, "eps", positive=True)
    order_weight = real(order_weight, "order_weight", non_negative=True)
    shift_weight = real(shift_weight, "shift_weight", non_negative=True)
    order_margin = real(order_margin, "order_margin")
    tau, kappa = _check_penalty_args(kind, tau, kappa)  # also when no coherence term is given
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    for name, pair in (("pi_pos", pi_pos), ("pi_neg", pi_neg), ("ref", ref)):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"{name} must be a (h_cho, h_rej) pair of [B, T, D] tensors")
    masks = attention_mask if attention_mask is not None else (None, None)
    s_pos = projection_scores(pi_pos[0], pi_pos[1], u, n_last, *masks)
    s_neg = projection_scores(pi_neg[0], pi_neg[1], u, n_last, *masks)
    s_ref = projection_scores(ref[0], ref[1], u, n_last, *masks)
    if not (s_pos.shape == s_neg.shape == s_ref.shape):
        raise ValueError("pi_pos, pi_neg and ref must share the batch size B")
    scale_b = _pair_scale(s_ref, scale, eps)
    proj = dict(projection=projection, scale=scale, saturation=saturation)
    proj_pos = projection_loss(s_pos, s_ref, +1, eps, **proj)
    proj_neg = projection_loss(s_neg, s_ref, -1, eps, **proj)
    zero = s_pos.new_zeros(())

    def coherence(inputs: CoherenceInputs | None, name: str) -> torch.Tensor:
        if inputs is None:
            return zero
        if inputs.logp_pi.dim() != 2 or inputs.logp_pi.shape[0] != s_pos.shape[0]:
            raise ValueError(
                f"{name}.logp_pi must be [B, L] with B = {s_pos.shape[0]}, got "
                f"{tuple(inputs.logp_pi.shape)}"
            )
        return sequence_penalty(
            inputs.logp_pi,
            inputs.logp_ref,
            inputs.mask,
            tau=tau,
            kind=kind,
            kappa=kappa,
            reduction="mean",
        ).to(zero.device, zero.dtype)  # the head may sit on another device than the loss layer

    coh_pos = coherence(coherence_pos, "coherence_pos")
    coh_neg = coherence(coherence_neg, "coherence_neg")
    if order_weight > 0:
        order = _batch_mean(
            torch.relu(order_margin - (s_pos - s_ref) / scale_b)
            + torch.relu(order_margin - (s_ref - s_neg) / scale_b)
        )
    else:
        order = zero
    if shift_weight > 0:
        shift = zero
        for c, pair in ((+1, pi_pos), (-1, pi_neg)):
            e = 0.5 * (projection_scores(pair[0], ref[0], u, n_last)
                       + projection_scores(pair[1], ref[1], u, n_last))
            if projection == "linear":
                shift = shift + _batch_mean(-c * e / scale_b)
            else:
                bounded = -saturation * torch.tanh(c * e / (saturation * scale_b))
                shift = shift + _batch_mean(bounded)
    else:
        shift = zero
    loss = (proj_pos + coh_pos) + (proj_neg + coh_neg) + order_weight * order
    if shift_weight > 0:
        loss = loss + shift_weight * shift
    return ContrastiveLoss(loss, proj_pos, proj_neg, coh_pos, coh_neg, order, shift)
