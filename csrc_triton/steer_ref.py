"""Plain torch reference of the steering operator (SPEC section 1); also the CPU path.

For every row ``n`` of ``out[N, D]`` whose slot ``k = slot[n]`` is ``>= 0``, with ``c = coeff[n]``:

    v[n]   = bias[k] + B[k] @ (A[k]^T @ src[n])          bias [K, D], A [K, D_src, R], B [K, D, R]
    y[n]   = out[n] + c * v[n]                           src [N, D_src], default: out itself
    y[n]  *= ||out[n]|| / ||y[n]||                       only with preserve_norm (and ||y[n]|| > 0)

Rows with ``slot < 0`` come back exactly as they were. Arithmetic is in float32 (float64 when
``out`` is float64); the result is cast back to ``out.dtype``.

Written to be obviously right rather than fast: a gather of ``bias[slot]`` and a loop over the
K bank entries, each applied to the rows whose slot selects it. Every function here is
differentiable by torch autograd. On CUDA it host-syncs (``nonzero``); the CUDA path is the
Triton kernel, this one serves CPU tensors and float64. Under ``torch.compile`` the row
selection becomes masks (no data-dependent shapes, so no graph break).
"""

from __future__ import annotations

import torch


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def steering_term(slot, bias, A, B, src, num_rows: int, dim: int, dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``v[n] = bias[k] + B[k] @ (A[k]^T @ src[n])`` for the rows with ``0 <= slot[n] < K``, in
    ``dtype``; other rows hold arbitrary finite values (callers mask them with
    :func:`steered_rows`). Returns ``(v [N, D], z [N, R] or None)``, ``z[n] = A[k]^T src[n]``.
    The low-rank loop visits each bank entry's rows (``nonzero``: a host sync on CUDA)."""
    num_entries = bias.shape[0] if bias is not None else A.shape[0] if A is not None else 0
    if bias is not None and num_entries > 0:  # an empty bank (K = 0) steers no row
        v = bias.to(dtype)[slot.clamp(0, num_entries - 1)]  # bias[slot[n]]
    else:
        v = torch.zeros(num_rows, dim, dtype=dtype, device=slot.device)
    z = None
    if A is not None:
        z = torch.zeros(num_rows, A.shape[-1], dtype=dtype, device=slot.device)
        compiling = torch.compiler.is_compiling()
        for k in range(num_entries):
            if compiling:  # torch.compile: no data-dependent shapes, so a masked dense form
                hit = (slot == k)[:, None]
                z_k = src.to(dtype) @ A[k].to(dtype)  # [N, R]
                z = torch.where(hit, z_k, z)
                v = v + torch.where(hit, z_k @ B[k].to(dtype).T, torch.zeros_like(v))
                continue
            rows = torch.nonzero(slot == k).flatten()
            if rows.numel() == 0:
                continue
            z_k = src[rows].to(dtype) @ A[k].to(dtype)  # [n_k, R]
            z = z.index_copy(0, rows, z_k)
            v = v.index_add(0, rows, z_k @ B[k].to(dtype).T)
    return v, z


def steered_rows(slot, bias, A) -> torch.Tensor:
    """``[N]`` bool: rows the operator changes, ``0 <= slot < K`` (a larger slot, refused by
    validation, leaves its row as it is)."""
    num_entries = bias.shape[0] if bias is not None else A.shape[0] if A is not None else 0
    return (slot >= 0) & (slot < num_entries)


def steer_ref(out, slot, coeff, bias=None, A=None, B=None, src=None, preserve_norm=False):
    """Out-of-place steering: returns a new tensor like ``out`` (see the module docstring).

    out [N, D]; slot [N] integer (-1 = untouched); coeff [N] float; bias [K, D] or None;
    A [K, D_src, R] and B [K, D, R] or both None; src [N, D_src] or None (= out).
    """
    dtype = _compute_dtype(out)
    x = out.to(dtype)
    source = x if src is None else src
    slot = slot.long()
    v, _ = steering_term(slot, bias, A, B, source, out.shape[0], out.shape[1], dtype)
    y = torch.addcmul(x, coeff.to(dtype)[:, None], v)  # x + c * v
    if preserve_norm:
        old = x.norm(dim=1, keepdim=True)
        new = y.norm(dim=1, keepdim=True)
        scale = torch.where(new > 0, old / torch.where(new > 0, new, torch.ones_like(new)), torch.ones_like(new))
        y = y * scale
    return torch.where(steered_rows(slot, bias, A)[:, None], y.to(out.dtype), out)


def steer_ref_(out, slot, coeff, bias=None, A=None, B=None, src=None, preserve_norm=False):
    """In-place form of :func:`steer_ref`: writes the result into ``out`` and returns it
    (rows with ``slot < 0`` are rewritten with their own unchanged values)."""
    with torch.no_grad():
        if torch.compiler.is_compiling():  # no data-dependent shapes under torch.compile
            return out.copy_(steer_ref(out, slot, coeff, bias, A, B, src, preserve_norm))
        rows = torch.nonzero(slot >= 0).flatten()
        if rows.numel() == out.shape[0]:
            out.copy_(steer_ref(out, slot, coeff, bias, A, B, src, preserve_norm))
        elif rows.numel():
            part = steer_ref(out[rows], slot[rows], coeff[rows], bias, A, B,
                             None if src is None else src[rows], preserve_norm)
            out[rows] = part
    return out


def steer_backward_ref(grad, out, slot, coeff, bias=None, A=None, B=None, src=None, preserve_norm=False):
    """Gradients of ``y = steer_ref(out, slot, coeff, bias, A, B, src, preserve_norm)``.

    With ``y' = x + c v`` (x = out, v = bias[k] + B[k] z, z = A[k]^T s, s = src or x) and
    ``y = r y'``, ``r = ||x|| / ||y'||`` when ``preserve_norm`` (else r = 1), for steered rows:

        g'      = r (g - (g . u) u),  u = y' / ||y'||         (g' = g without preserve_norm)
        d out   = g' + (g . u) x / ||x||  [+ d src when src is out]   (rows with slot < 0: g)
        d coeff = g' . v
        gv      = c g';  d bias[k] = sum_{n: slot=k} gv;  d B[k] = sum gv z^T
        gz      = B[k]^T gv;  d A[k] = sum s gz^T;  d src = A[k] gz

    Returns ``(d_out, d_coeff, d_bias, d_A, d_B, d_src)`` in the compute dtype (float32, or
    float64 for float64 inputs); entries for absent inputs are None.
    """
    dtype = _compute_dtype(out)
    g = grad.to(dtype)
    x = out.to(dtype)
    s = x if src is None else src.to(dtype)
    slot = slot.long()
    steered = steered_rows(slot, bias, A)[:, None]
    c = coeff.to(dtype)[:, None]
    v, z = steering_term(slot, bias, A, B, s, out.shape[0], out.shape[1], dtype)
    y1 = x + c * v
    if preserve_norm:
        norm_x = x.norm(dim=1, keepdim=True)
        norm_y = y1.norm(dim=1, keepdim=True)
        ok = norm_y > 0
        safe_y = torch.where(ok, norm_y, torch.ones_like(norm_y))
        safe_x = torch.where(norm_x > 0, norm_x, torch.ones_like(norm_x))
        u = y1 / safe_y
        gu = (g * u).sum(dim=1, keepdim=True)
        g1 = torch.where(ok, norm_x / safe_y * (g - gu * u), g)
        dx = g1 + torch.where(ok & (norm_x > 0), gu * x / safe_x, torch.zeros_like(x))
    else:
        g1 = g
        dx = g.clone()
    g1 = torch.where(steered, g1, torch.zeros_like(g1))
    dx = torch.where(steered, dx, g)
    d_coeff = (g1 * v).sum(dim=1)
    gv = c * g1
    d_bias = d_A = d_B = None
    ds = torch.zeros_like(s) if A is not None else None
    if bias is not None:
        d_bias = torch.zeros(bias.shape, dtype=dtype, device=bias.device)
    if A is not None:
        d_A = torch.zeros(A.shape, dtype=dtype, device=A.device)
        d_B = torch.zeros(B.shape, dtype=dtype, device=B.device)
    num_entries = bias.shape[0] if bias is not None else A.shape[0] if A is not None else 0
    for k in range(num_entries):
        rows = (slot == k)[:, None]
        gv_k = torch.where(rows, gv, torch.zeros_like(gv))
        if bias is not None:
            d_bias[k] = gv_k.sum(dim=0)
        if A is not None:
            z_k = torch.where(rows, z, torch.zeros_like(z))
            d_B[k] = gv_k.T @ z_k
            gz = gv_k @ B[k].to(dtype)  # [N, R]
            d_A[k] = torch.where(rows, s, torch.zeros_like(s)).T @ gz  # other rows' NaN/Inf stay out
            ds = ds + gz @ A[k].to(dtype).T
    d_src = None
    if A is not None:
        if src is None:
            dx = dx + ds
        else:
            d_src = ds
    return dx, d_coeff, d_bias, d_A, d_B, d_src
