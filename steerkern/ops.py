"""Public tensor ops: argument validation, then dispatch to a backend.

Backends:
- ``"triton"``: the fused kernels of ``csrc_triton`` (compiled on CUDA; on CPU tensors only
  when Triton's interpreter is on, ``TRITON_INTERPRET=1`` set before the kernels are imported).
- ``"torch"``: the plain torch references beside the kernels.
- ``"auto"`` (default): CUDA tensors -> Triton, CPU tensors -> torch.

``use_backend("triton")`` is a context manager that forces a backend (kernel tests use it to
run the Triton kernels under the interpreter on CPU).
"""

from __future__ import annotations

import contextlib
import os

import torch

from steerkern.checks import count, flag, real, with_data

_BACKENDS = ("auto", "triton", "torch")
_backend = "auto"


def interpreting() -> bool:
    """True when Triton's interpreter is switched on (kernels run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str):
    """Force ``name`` ("auto", "triton" or "torch") inside the ``with`` block."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    previous, _backend = _backend, name
    try:
        yield
    finally:
        _backend = previous


def _use_triton(t: torch.Tensor) -> bool:
    """Whether a call on tensor ``t`` goes to the Triton kernel."""
    if _backend == "torch":
        return False
    if t.is_cuda:
        return True
    if _backend == "triton":
        if not interpreting():
            raise RuntimeError(
                "backend 'triton' on CPU tensors needs Triton's interpreter: set "
                "TRITON_INTERPRET=1 before importing steerkern, or use backend 'torch'"
            )
        return True
    return False


# --- steering operator (SPEC section 1) -------------------------------------------------------
# steer_ / steer are defined below this line.

_STEER_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_RANK = 64  # largest low-rank R the fused kernel takes (its R_PAD tiles stop at 64)


def _check_float(name: str, t, out: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"steer_: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _STEER_DTYPES:
        raise TypeError(f"steer_: {name} must be float32/float16/bfloat16/float64, got {t.dtype}; cast it with .to(out.dtype)")
    if t.device != out.device:
        raise ValueError(f"steer_: {name} is on {t.device} but out is on {out.device}; move it with .to(out.device)")
    with_data(t, f"steer_: {name}")


def _validate_steer(out, slot, coeff, bias, A, B, src, check_values: bool, in_place: bool = True) -> None:
    """Shape / dtype / device checks of steer_ / steer; with ``check_values`` also the values
    (:func:`_check_values`: slots < K, finite coefficients and bank, one host sync)."""
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"steer_: out must be a 2-D tensor [N, D] (reshape [B, T, D] hidden states with .view(-1, D)), got {got}")
    _check_float("out", out, out)
    N, D = out.shape
    if in_place and D > 1 and out.stride(1) != 1:
        raise ValueError(f"steer_: out must have unit stride along D (got strides {out.stride()}); steer a contiguous tensor and copy back")
    if in_place and N > 1 and out.stride(0) < D:
        raise ValueError(f"steer_: out has overlapping rows (strides {out.stride()}); in-place steering needs distinct rows, pass out.contiguous()")
    if not isinstance(slot, torch.Tensor) or slot.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"steer_: slot must be an int32/int64 tensor [N] (-1 = unsteered), got {getattr(slot, 'dtype', type(slot).__name__)}")
    with_data(slot, "steer_: slot")
    if slot.shape != (N,):
        raise ValueError(f"steer_: slot must have shape [N] = [{N}] (one bank index per row of out), got {tuple(slot.shape)}")
    if slot.device != out.device:
        raise ValueError(f"steer_: slot is on {slot.device} but out is on {out.device}; build it on out's device")
    _check_float("coeff", coeff, out)
    if coeff.shape != (N,):
        raise ValueError(f"steer_: coeff must have shape [N] = [{N}] (one coefficient per row), got {tuple(coeff.shape)}; use coeff.expand({N}) for a shared value")
    if (A is None) != (B is None):
        raise ValueError("steer_: A and B come together (the low-rank term B[k] @ A[k]^T @ src); pass both or neither")
    num_entries = None
    if bias is not None:
        _check_float("bias", bias, out)
        if bias.dim() != 2 or bias.shape[1] != D:
            raise ValueError(f"steer_: bias must be [K, D] with D = {D}, got {tuple(bias.shape)}; a single vector v is bias=v[None]")
        num_entries = bias.shape[0]
    d_src = D
    if src is not None:
        _check_float("src", src, out)
        if src.dim() != 2 or src.shape[0] != N:
            raise ValueError(f"steer_: src must be [N, D_src] with N = {N} rows like out, got {tuple(src.shape)}")
        if A is None:
            raise ValueError("steer_: src is only read by the low-rank term; pass A and B with it, or drop src")
        d_src = src.shape[1]
    if A is not None:
        _check_float("A", A, out)
        _check_float("B", B, out)
        if A.dim() != 3 or B.dim() != 3:
            raise ValueError(f"steer_: A must be [K, D_src, R] and B [K, D, R], got A {tuple(A.shape)} and B {tuple(B.shape)}")
        K, R = B.shape[0], B.shape[2]
        if tuple(A.shape) != (K, d_src, R) or B.shape[1] != D:
            raise ValueError(f"steer_: expected A [K, D_src, R] = [{K}, {d_src}, {R}] and B [K, D, R] = [{K}, {D}, {R}] (D_src = src.shape[1], or D without src), got A {tuple(A.shape)} and B {tuple(B.shape)}")
        if R == 0:
            raise ValueError(f"steer_: rank R must be in 1..{MAX_RANK}, got R = 0 (A {tuple(A.shape)}, B {tuple(B.shape)}): "
                             "a rank-0 low-rank term does nothing; pass bias only (A=B=None) or rank R >= 1")
        if R > MAX_RANK:
            raise ValueError(f"steer_: rank R must be in 1..{MAX_RANK}, got R = {R}; truncate A and B to their top {MAX_RANK} components")
        if num_entries is not None and num_entries != K:
            raise ValueError(f"steer_: bias has K = {num_entries} entries but A/B have K = {K}; every bank tensor needs the same K")
        num_entries = K
    if check_values and N > 0 and num_entries is not None:
        _check_values(slot, coeff, num_entries, bias=bias, A=A, B=B)
    for name, t in (("out", out), ("coeff", coeff), ("bias", bias), ("A", A), ("B", B), ("src", src)):
        if in_place and t is not None and t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"steer_: {name} requires grad; steer_ is in place and not differentiable, use steerkern.ops.steer() for training")


def _checked(validate, preserve_norm) -> bool:
    """Whether steer_ / steer check their arguments (``validate``: ``True``, ``"full"`` or
    ``False``); when they do, ``preserve_norm`` must be a bool too: a truthy string such as
    ``"no"`` would otherwise rescale every steered row."""
    if validate is False:  # the hot path: nothing more to look at
        return False
    if not (validate is True or (isinstance(validate, str) and validate == "full")):
        try:
            validate = flag(validate, "steer_: validate")  # numpy bools too
        except TypeError:
            raise ValueError(f"steer_: validate must be True, False or 'full', got {validate!r}") from None
    if validate:
        flag(preserve_norm, "steer_: preserve_norm")
    return bool(validate)


def _check_values(slot, coeff, num_entries: int, **bank) -> None:
    """Value checks of steer_ / steer, one host sync for all of them: every slot is ``< K``,
    every steered row's coefficient is finite, every bank tensor (bias, A, B) is finite.

    slot [N], coeff [N], num_entries = K, bank: name -> [K, ...] tensor or None."""
    steered = slot >= 0
    bad_coeff = steered & ~torch.isfinite(coeff)
    named = [(name, t) for name, t in bank.items() if t is not None]
    flags = [slot.max().to(torch.int64), bad_coeff.any().to(torch.int64)]
    flags += [(~torch.isfinite(t)).any().to(torch.int64) for _, t in named]
    top, coeff_bad, *bank_bad = torch.stack(flags).tolist()
    if top >= num_entries:
        raise ValueError(f"steer_: slot holds {top} but the bank has K = {num_entries} entries; slots must be -1 or in [0, {num_entries})")
    if coeff_bad:
        row = int(bad_coeff.nonzero()[0, 0])
        raise ValueError(f"steer_: coeff[{row}] is {coeff[row].item()} on a steered row (slot {int(slot[row])}); coefficients must be finite, fix the value or set that row's slot to -1")
    for (name, t), bad in zip(named, bank_bad):
        if bad:
            entry = int((~torch.isfinite(t)).flatten(1).any(1).nonzero()[0, 0])
            raise ValueError(f"steer_: {name}[{entry}] holds NaN or Inf values; every bank entry must be finite (check the vector that filled entry {entry})")


def _dtype(t):
    return None if t is None else t.dtype


def _without_autocast(t: torch.Tensor):
    """Autocast off on ``t``'s device for the torch reference: it computes in float32 (float64
    for float64 inputs) as the kernel does, and writes its products into buffers of that dtype,
    which autocast's half-precision matmuls would not match."""
    try:
        if torch.is_autocast_enabled(t.device.type):
            return torch.autocast(t.device.type, enabled=False)
    except (RuntimeError, TypeError):  # a device type autocast does not know
        pass
    return contextlib.nullcontext()


def _unit_last_stride(t):
    """``t`` itself when its last dim is contiguous (or has one element), else a contiguous copy."""
    if t is None or t.shape[-1] <= 1 or t.stride(-1) == 1:
        return t
    return t.contiguous()


def steer_(
    out: torch.Tensor,
    slot: torch.Tensor,
    coeff: torch.Tensor,
    bias: torch.Tensor | None = None,
    A: torch.Tensor | None = None,
    B: torch.Tensor | None = None,
    src: torch.Tensor | None = None,
    preserve_norm: bool = False,
    *,
    validate: bool | str = True,
) -> torch.Tensor:
    """Steer the rows of ``out`` in place (SPEC section 1) and return ``out``.

    For every row ``n`` whose slot ``k = slot[n]`` is ``>= 0``, with ``c = coeff[n]``::

        out[n] <- out[n] + c * (bias[k] + B[k] @ (A[k]^T @ src[n]))
        out[n] <- out[n] * ||out_before[n]|| / ||out[n]||          (preserve_norm)

    Rows with ``slot < 0`` are left bitwise untouched. Special cases: additive vector =
    ``bias`` only; ablation of unit ``u`` = ``A=u, B=-u, c=1``; clamp to ``t`` along ``u`` =
    ``bias=t*u, A=u, B=-u, c=1``; weight-delta steering = ``A``, ``B`` with ``src`` = module input.

    Args:
        out: ``[N, D]`` hidden states (fp32/fp16/bf16; float64 on the torch path), unit stride
            along D (a row stride is fine: ``h.view(-1, D)`` of ``[B, T, D]``).
        slot: ``[N]`` int32/int64 bank index per row, ``-1`` = unsteered.
        coeff: ``[N]`` float coefficient per row (any float dtype; ``c.expand(N)`` for a scalar).
        bias: ``[K, D]`` additive entries, or None.
        A, B: ``[K, D_src, R]`` and ``[K, D, R]`` low-rank entries (together), ``1 <= R <= 64``.
        src: ``[N, D_src]`` input of the low-rank term; default ``out`` read before the update.
        preserve_norm: rescale every steered row to its pre-steering L2 norm.
        validate: ``True`` checks shapes, dtypes and devices (no host sync) and, for CPU
            tensors only, the values: every slot is ``< K``, every steered row's coefficient
            and every bank entry (bias, A, B) is finite (NaN/Inf raise ValueError);
            ``"full"`` also checks the values on CUDA (one host sync); ``False`` skips all
            checks (hot path after a first validated call). Without the slot check, a row
            with ``slot >= K`` is left untouched (never read out of bounds).

    Dispatch: CUDA tensors run the fused Triton kernel (a float64 out, bias, A, B or src runs
    the torch reference); CPU tensors run the torch reference, or the kernel under Triton's
    interpreter inside ``use_backend("triton")``.

    Example::

        h2 = hidden.view(-1, D)                       # [B*T, D]
        steer_(h2, slot_per_token, coeff_per_token, bias=bank_bias)
    """
    if _checked(validate, preserve_norm):
        check_values = validate == "full" or not out.is_cuda
        _validate_steer(out, slot, coeff, bias, A, B, src, check_values)
    if bias is None and A is None:
        return out
    bias, A, B, src = (_unit_last_stride(t) for t in (bias, A, B, src))
    if _use_triton(out) and torch.float64 not in (out.dtype, _dtype(bias), _dtype(A), _dtype(B), _dtype(src)):
        if out.is_cuda and torch.compiler.is_compiling():
            # Opaque to dynamo and inductor: no graph break, CUDA-graph safe.
            torch.ops.steerkern.steer_cuda_(out, slot, coeff, bias, A, B, src, bool(preserve_norm))
            return out
        from csrc_triton.steer import steer_triton_

        return steer_triton_(out, slot, coeff, bias, A, B, src, preserve_norm)
    from csrc_triton.steer_ref import steer_ref_

    with _without_autocast(out):
        return steer_ref_(out, slot, coeff, bias, A, B, src, preserve_norm)


@torch.library.custom_op("steerkern::steer_cuda_", mutates_args=("out",), device_types="cuda")
def _steer_cuda_op(
    out: torch.Tensor,
    slot: torch.Tensor,
    coeff: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor | None,
    B: torch.Tensor | None,
    src: torch.Tensor | None,
    preserve_norm: bool,
) -> None:
    """The fused kernel as a torch custom op, for ``torch.compile``: dynamo does not trace the
    Triton launcher (autotuning with pruning and ``restore_value``); it sees one mutating op."""
    from csrc_triton.steer import steer_triton_

    steer_triton_(out, slot, coeff, bias, A, B, src, preserve_norm)


@_steer_cuda_op.register_fake
def _(out, slot, coeff, bias, A, B, src, preserve_norm) -> None:
    return None


class _Steer(torch.autograd.Function):
    """y = steer(out, ...) out of place; the backward is steer_backward_ref (torch ops)."""

    @staticmethod
    def forward(ctx, out, slot, coeff, bias, A, B, src, preserve_norm):
        y = out.detach().clone(memory_format=torch.contiguous_format)
        # src defaults to out before the update; y is about to change, so read from out
        source = src if src is not None or A is None else out.detach()
        with torch.no_grad():
            steer_(y, slot, coeff, bias, A, B, source, preserve_norm, validate=False)
        ctx.save_for_backward(out, slot, coeff, bias, A, B, src)
        ctx.preserve_norm = preserve_norm
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        from csrc_triton.steer_ref import steer_backward_ref

        out, slot, coeff, bias, A, B, src = ctx.saved_tensors
        with _without_autocast(grad):
            grads = steer_backward_ref(grad, out, slot, coeff, bias, A, B, src, ctx.preserve_norm)
        d_out, d_coeff, d_bias, d_A, d_B, d_src = grads
        cast = lambda g, t: None if g is None or t is None else g.to(t.dtype)
        return (
            cast(d_out, out), None, cast(d_coeff, coeff), cast(d_bias, bias),
            cast(d_A, A), cast(d_B, B), cast(d_src, src), None,
        )


def steer(
    out: torch.Tensor,
    slot: torch.Tensor,
    coeff: torch.Tensor,
    bias: torch.Tensor | None = None,
    A: torch.Tensor | None = None,
    B: torch.Tensor | None = None,
    src: torch.Tensor | None = None,
    preserve_norm: bool = False,
    *,
    validate: bool | str = True,
) -> torch.Tensor:
    """Differentiable, out-of-place :func:`steer_`: returns a new ``[N, D]`` tensor.

    Same arguments and maths as :func:`steer_` (``src`` defaults to ``out``). The forward runs
    the fused kernel on a copy of ``out``; the backward (torch ops, see
    ``csrc_triton.steer_ref.steer_backward_ref``) gives gradients for ``out``, ``src``,
    ``coeff``, ``bias``, ``A`` and ``B``. Memory: the backward builds a few ``[N, D]`` fp32
    temporaries and loops over the K bank entries.
    """
    if _checked(validate, preserve_norm):
        check_values = validate == "full" or not out.is_cuda
        _validate_steer(out, slot, coeff, bias, A, B, src, check_values, in_place=False)
    return _Steer.apply(out, slot, coeff, bias, A, B, src, bool(preserve_norm))


# --- fused token log-probs (SPEC section 2) ---------------------------------------------------
# token_logprobs is defined below this line.


def _token_logprobs_impl(use_triton: bool):
    if use_triton:
        from csrc_triton import logprobs as impl
    else:
        from csrc_triton import logprobs_ref as impl
    return impl


class _TokenLogprobs(torch.autograd.Function):
    """logp = token_logprobs(h, W, labels); saves h, W, labels and the per-row lse only. Both
    directions run with autocast off (``_without_autocast``): fp32 accumulation whatever the
    caller's autocast state, on the torch path as in the kernel."""

    @staticmethod
    def forward(ctx, h, W, labels, ignore_index, use_triton, softcap):
        impl = _token_logprobs_impl(use_triton)
        with _without_autocast(h):
            logp, lse = impl.token_logprobs_fwd(h, W, labels, ignore_index, softcap=softcap)
        ctx.save_for_backward(h, W, labels, lse)
        ctx.ignore_index = ignore_index
        ctx.use_triton = use_triton
        ctx.softcap = softcap
        return logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        h, W, labels, lse = ctx.saved_tensors
        need_h, need_W = ctx.needs_input_grad[:2]
        # a backward run inside an autocast block would give the reference's dW product in the
        # autocast dtype: fp32 (float64) throughout, as the kernel computes
        with _without_autocast(h):
            dh, dW = _token_logprobs_impl(ctx.use_triton).token_logprobs_bwd(
                h, W, labels, lse, grad.contiguous(), ctx.ignore_index, need_h=need_h, need_W=need_W,
                softcap=ctx.softcap,
            )
        return dh, dW, None, None, None, None


def token_logprobs(
    h: torch.Tensor, W: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, *,
    softcap: float | None = None,
) -> torch.Tensor:
    """Per-token log-probabilities under an output head, never building ``[N, V]`` logits.

    ``logp[n] = z[n, y[n]] - logsumexp(z[n])`` with logits ``z[n] = W h[n]``, or
    ``z[n] = softcap * tanh(W h[n] / softcap)`` for a model that soft-caps its logits (Gemma 2's
    ``final_logit_softcapping``), accumulated in fp32 (float64 for float64 inputs) with an
    online logsumexp over vocabulary chunks; the backward recomputes the logits chunk by chunk,
    gives ``W`` a gradient only when it requires one, and skips rows whose upstream gradient is
    zero. Extra memory is O(N + chunk), independent of ``V``.

    Args:
        h: hidden states ``[*, D]`` (fp32, fp16, bf16 or float64), any leading shape, ``D >= 1``
            (``D = 0`` raises ``ValueError``).
        W: output head (``lm_head.weight``) ``[V, D]``, ``V >= 1``, same dtype and device as ``h``.
        labels: target token ids ``[*]`` (the leading shape of ``h``), int32 or int64, each in
            ``[0, V)`` or equal to ``ignore_index``.
        ignore_index: label value of rows to skip: their log-prob is 0 with zero gradient.
        softcap: ``None`` (the head's output is the logits) or the cap ``c > 0`` of
            ``c * tanh(W h / c)``.

    Returns:
        ``[*]`` fp32 log-probs (float64 for float64 inputs), differentiable w.r.t. ``h`` and ``W``.

    Example::

        logp = token_logprobs(hidden[:, :-1].reshape(-1, D), model.lm_head.weight,
                              input_ids[:, 1:].reshape(-1))
    """
    if not isinstance(h, torch.Tensor) or not isinstance(W, torch.Tensor):
        raise TypeError("token_logprobs: h and W must be torch.Tensor")
    if not isinstance(labels, torch.Tensor):
        raise TypeError("token_logprobs: labels must be a torch.Tensor of token ids")
    for name, t in (("h", h), ("W", W), ("labels", labels)):
        with_data(t, f"token_logprobs: {name}")
    if h.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"token_logprobs: h must be float32/float16/bfloat16/float64, got {h.dtype}")
    if W.dtype != h.dtype:
        raise TypeError(
            f"token_logprobs: W has dtype {W.dtype} but h has {h.dtype}; cast one of them "
            "(e.g. W.to(h.dtype))"
        )
    if h.dim() < 1 or W.dim() != 2:
        raise ValueError(
            f"token_logprobs: expected h [*, D] and W [V, D], got h {tuple(h.shape)} and "
            f"W {tuple(W.shape)}"
        )
    if W.shape[1] != h.shape[-1]:
        raise ValueError(
            f"token_logprobs: hidden size mismatch: h has D={h.shape[-1]} but W is "
            f"{tuple(W.shape)}; W must be [V, D] (lm_head.weight, not its transpose)"
        )
    if W.shape[1] == 0:
        raise ValueError(
            f"token_logprobs: h and W have hidden size D = 0 (h {tuple(h.shape)}, W {tuple(W.shape)}): "
            "a head with no inputs gives every token the same logit; pass the model's final "
            "hidden states and its lm_head.weight [V, D] with D >= 1"
        )
    if labels.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"token_logprobs: labels must be int32 or int64, got {labels.dtype}")
    if tuple(labels.shape) != tuple(h.shape[:-1]):
        raise ValueError(
            f"token_logprobs: labels {tuple(labels.shape)} must have h's leading shape "
            f"{tuple(h.shape[:-1])}"
        )
    if h.device != W.device or labels.device != h.device:
        raise ValueError(
            f"token_logprobs: h ({h.device}), W ({W.device}) and labels ({labels.device}) must be "
            "on one device"
        )
    V = W.shape[0]
    if V == 0:
        raise ValueError("token_logprobs: W has no vocabulary rows (V = 0)")
    if softcap is not None:
        softcap = real(softcap, "token_logprobs: softcap", positive=True,
                       maximum=torch.finfo(torch.float32).max,  # the kernels take it in fp32
                       meaning=" or None (the c of c * tanh(logits / c))")
    ignore_index = count(ignore_index, "token_logprobs: ignore_index", minimum=None,
                         meaning=" (the label value of rows to skip)")
    lead = labels.shape
    h2 = h.reshape(-1, h.shape[-1])
    y = labels.reshape(-1).contiguous()
    if y.numel():
        bad = (y != ignore_index) & ((y < 0) | (y >= V))
        if bool(bad.any()):
            first = y[bad][0].item()
            raise ValueError(
                f"token_logprobs: label {first} is outside [0, {V}) and is not ignore_index "
                f"({ignore_index}); mask such positions with ignore_index"
            )
    if h2.shape[0] == 0:
        dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
        return (h2.sum(-1) + W.sum() * 0).to(dtype).reshape(lead)
    # the kernels need unit column stride (rows may be strided)
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    if W.stride(-1) != 1:
        W = W.contiguous()
    use_triton = _use_triton(h2)
    logp = _TokenLogprobs.apply(h2, W, y, int(ignore_index), use_triton, softcap)
    return logp.reshape(lead)
