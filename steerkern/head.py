"""A causal LM's output head as one matrix, for per-token log-probs that never build logits.

Reading the log-probability of one given token per position needs ``logsumexp`` over the
vocabulary, not the ``[rows, T, V]`` logits a forward pass returns (0.2 MB per position in fp32
for a 49k vocabulary). So the forward stops at the head's input, the final normed hidden state
``h`` (:class:`FinalHidden`), and :func:`steerkern.ops.token_logprobs` walks the vocabulary in
chunks:

    u = a (W h + b)             logits = u, or c tanh(u / c) for a model that soft-caps them
    logp[n] = logits[n, y[n]] - logsumexp_v logits[n, v]

``W [V, D]`` and ``b`` are the head's weight and bias (:func:`head_matrix` appends ``b`` as a
column, with a 1 appended to ``h``), ``a`` the constant factor some models apply after the
head (Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``), measured once on a real pass
(:func:`logit_scale`), and ``c`` the config's ``final_logit_softcapping`` (Gemma 2, Gemma 3n,
VaultGemma, ...; :func:`logit_softcap`). A model that transforms its logits otherwise is
refused.

Used by ``steerkern.train`` (the coherence term's log-probs) and ``steerkern.sweep`` (the ΔNLL
of a sweep's generations).
"""

from __future__ import annotations

import contextlib
import math

import torch

from steerkern.models import text_config

IGNORE = -100


class StopAtHead(Exception):
    """Raised by the output-head pre-hook once the final hidden state is captured."""


def output_head(model, purpose: str):
    """The model's output head module (``get_output_embeddings()``), or ``ValueError`` naming
    ``purpose`` when it has none with a weight or its config's logit soft-cap is not a positive
    number."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(
            f"{type(model).__name__} has no output head (get_output_embeddings()): {purpose} "
            "needs a causal LM"
        )
    logit_softcap(model)
    return head


def logit_softcap(model) -> float | None:
    """``c`` of the model's ``logits = c tanh(u / c)`` (``config.final_logit_softcapping``, or
    its ``text_config``'s), ``None`` when the model does not soft-cap; ``ValueError`` for a cap
    that is not a finite positive number."""
    cap = getattr(text_config(model), "final_logit_softcapping", None)
    if cap is None:
        return None
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap) \
            or cap <= 0:
        raise ValueError(
            f"{type(model).__name__}'s config.final_logit_softcapping is {cap!r}: a soft-cap must be "
            "None or a finite number > 0")
    return float(cap)


@contextlib.contextmanager
def _weights_loaded(head):
    """Inside, ``head``'s weights are real tensors on its execution device, also when accelerate
    offloads it (``cpu_offload``, ``device_map`` entries "cpu"/"disk" beside a GPU: they sit on
    'meta' between calls, and its dispatch hook ``_hf_hook`` loads them for each forward, as here);
    a head that is not offloaded is left as it is."""
    hook = getattr(head, "_hf_hook", None)
    if head.weight.device.type != "meta" or hook is None:
        yield
        return
    hook.pre_forward(head)
    try:
        yield
    finally:
        hook.post_forward(head, None)


def head_matrix(head, scale: float = 1.0) -> torch.Tensor:
    """The output head as one matrix, times the model's logit factor ``a``
    (:func:`logit_scale`): ``a W`` ``[V, D]``, or ``a [W | b]`` ``[V, D + 1]`` for a head with a
    bias (GPT-J, Phi), so that ``[h, 1] @ (a [W | b])^T = a (W h + b)``, the model's logits.
    On the head's execution device; an offloaded head's weights are read as its forward reads
    them (:func:`_weights_loaded`), and the matrix keeps them there."""
    with _weights_loaded(head):
        weight = head.weight.detach()
        if getattr(head, "bias", None) is not None:
            weight = torch.cat([weight, head.bias.detach().to(weight.dtype)[:, None]], dim=1)
    if weight.device.type == "meta":
        raise ValueError(
            f"the output head {type(head).__name__} has its weight on 'meta' and no dispatch hook "
            "loads it: load the model with device_map=... (accelerate) or move it to a device")
    return weight if scale == 1.0 else weight * scale


@torch.no_grad()
def logit_scale(model, head, ids, mask, positions, softcap: float | None = None) -> float:
    """The factor ``a`` with ``logits = a * head(h)`` for this model (``logits = c tanh(a *
    head(h) / c)`` with a soft-cap ``c``, :func:`logit_softcap`), measured on one pass of
    ``ids``/``mask``/``positions`` ``[B, T]``.

    Most causal LMs return the head's output as their logits (``a = 1``); some scale it after
    the head: Cohere multiplies by ``config.logit_scale`` (0.0625 by default), Granite divides by
    ``config.logits_scaling``. ``a`` is the least-squares fit ``<l, z> / <z, z>`` (``z`` the
    head's output, ``l`` the logits, or ``c atanh(logits / c)`` over the logits below 0.9 c in
    magnitude for a soft-capped model), snapped to 1 within 1e-3; a model whose logits are not
    so made from ``z`` (a soft-cap its config does not name, an added bias) raises
    ``ValueError`` ("constant factor"), as does a head whose input is not the ``[B, T, D]``
    states of the batch's positions (which :func:`head_logprobs` reads).
    """
    seen = {}

    def read(module, args, output):
        seen["h"], seen["z"] = args[0] if args else None, output

    handle = head.register_forward_hook(read)
    try:
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    finally:
        handle.remove()
    h = seen.get("h")
    if not isinstance(h, torch.Tensor) or tuple(h.shape[:-1]) != tuple(ids.shape):
        raise ValueError(
            f"{type(model).__name__}: its output head's input is not the [batch, tokens, hidden] "
            "states of the batch (the fused token log-probs read those)")
    logits = getattr(out, "logits", None)
    z = seen.get("z")
    if not isinstance(logits, torch.Tensor) or not isinstance(z, torch.Tensor) \
            or logits.shape != z.shape:
        raise ValueError(
            f"{type(model).__name__}: could not compare its logits with its output head's output "
            "(the fused token log-probs need logits = a * lm_head(h))")
    if not (bool(torch.isfinite(z).all()) and bool(torch.isfinite(logits).all())):
        raise ValueError(
            f"{type(model).__name__}'s logits hold Inf or NaN on the probe text: the model overflows "
            "(float16 weights of a checkpoint trained in bfloat16 often do); load it in bfloat16 or float32")
    tol = 1e-2 if z.dtype in (torch.float16, torch.bfloat16) else 1e-3  # relative, of max |logit|
    logits, z = logits.double(), z.double()
    if not bool(z.any()) and not bool(logits.any()):
        return 1.0  # an all-zero head (any factor fits)
    if softcap is None:
        uncapped, zs = logits, z
    else:  # invert the cap where it is well conditioned
        inside = logits.abs() < 0.9 * softcap
        uncapped, zs = softcap * torch.atanh(logits[inside] / softcap), z[inside]
    # no logit where the cap can be inverted (all beyond 0.9 c): a = 1, checked below
    a = float((uncapped * zs).sum() / (zs * zs).sum()) if bool(zs.any()) else 1.0
    made = a * z if softcap is None else softcap * torch.tanh(a * z / softcap)
    if not (math.isfinite(a) and a > 0) or \
            float((logits - made).abs().max()) > tol * max(float(logits.abs().max()), 1e-6):
        how = "a constant factor" if softcap is None else \
            f"a constant factor and the soft-cap {softcap:g} of its config"
        raise ValueError(
            f"{type(model).__name__} transforms its logits after the output head in a way other "
            f"than {how} (e.g. an unnamed soft-cap); the fused token log-probs cannot model it")
    return 1.0 if abs(a - 1.0) <= 1e-3 else a


def head_logprobs(h_final: torch.Tensor, W: torch.Tensor, labels: torch.Tensor,
                  softcap: float | None = None) -> torch.Tensor:
    """Per-token log-probs ``[R, L-1]`` (fp32) of ``labels [R, L-1]`` (``IGNORE``: 0) from
    ``h_final [R, L, D]`` under the head matrix ``W`` (:func:`head_matrix`: ``[V, D]``, or
    ``[V, D + 1]`` with the bias) and the model's soft-cap (:func:`logit_softcap`): position
    ``t``'s state scores ``labels[:, t]``. Runs on ``W``'s device (a model split by
    ``device_map`` hands its head states from another one)."""
    from steerkern import ops

    rows, width, dim = h_final.shape
    flat = h_final[:, :-1, :].reshape(-1, dim).to(W.device)
    if W.shape[1] == dim + 1:
        flat = torch.cat([flat, flat.new_ones(flat.shape[0], 1)], dim=1)
    return ops.token_logprobs(flat, W.to(flat.dtype), labels.reshape(-1).to(W.device),
                              ignore_index=IGNORE, softcap=softcap).view(rows, width - 1)


class HeadLogits:
    """The model's logits as :func:`head_logprobs` computes them: ``u = W [h, 1]`` with ``W`` the
    head matrix times the measured factor ``a`` (:func:`head_matrix`, :func:`logit_scale`),
    soft-capped by ``softcap`` (:func:`logit_softcap`). ``HeadLogits.measure(model, head, ids,
    mask, positions)`` makes one from a pass of ``[B, T]`` prompts."""

    def __init__(self, W: torch.Tensor, softcap: float | None = None):
        self.W, self.softcap = W, softcap

    @classmethod
    def measure(cls, model, head, ids, mask, positions) -> HeadLogits:
        softcap = logit_softcap(model)
        return cls(head_matrix(head, logit_scale(model, head, ids, mask, positions, softcap)), softcap)

    def logprobs(self, h_final: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """:func:`head_logprobs` of ``h_final [R, L, D]`` at ``labels [R, L-1]``."""
        return head_logprobs(h_final, self.W, labels, self.softcap)


class FinalHidden:
    """``with FinalHidden(head) as final:`` a pre-hook on ``head`` that keeps its input (the
    final hidden state, ``final.h``) and stops the forward pass there (:class:`StopAtHead`, which
    the ``with`` block swallows), so the head never runs. ``final.h`` stays ``None`` when the
    pass completed without calling the head."""

    def __init__(self, head):
        self.head, self.h, self.handle = head, None, None

    def __enter__(self):
        def read(module, args):
            self.h = args[0]
            raise StopAtHead

        self.h = None
        self.handle = self.head.register_forward_pre_hook(read)
        return self

    def __exit__(self, kind, value, traceback):
        self.handle.remove()
        return kind is StopAtHead
