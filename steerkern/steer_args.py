"""The per-batch arguments of steering, checked and converted once on the host, never inside a
hook: ``positions`` (a mode, a token index or a bool mask), per-row ``coeff`` and ``slots``, and
the bank's own copies of them (:class:`steerkern.control.SteeringBank`)."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from steerkern.checks import with_data

POSITIONS = ("all", "prompt", "generated")
FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # coefficients are held as float32


def check_positions(positions) -> tuple[str, torch.Tensor | None]:
    """``(mode, mask)`` of a bank's ``positions``: the mode ("all", "prompt", "generated",
    "from" for a token index, "mask") and, for a bool ``[batch, seq]`` mask, the bank's own copy
    of it. A bad value raises ``ValueError`` / ``TypeError`` naming it and the choices."""
    if isinstance(positions, numbers.Integral) and not isinstance(positions, bool):
        if positions < 0:
            raise ValueError(f"positions={positions}: a token index must be >= 0 (steer each row's "
                             "tokens from its real token `positions` on)")
        return "from", None
    if isinstance(positions, str):
        if positions not in POSITIONS:
            raise ValueError(f"positions={positions!r}: use one of {POSITIONS} or a boolean mask [batch, seq]")
        return positions, None
    if isinstance(positions, torch.Tensor):
        with_data(positions, "positions mask")
        if positions.dim() != 2 or positions.dtype != torch.bool:
            raise ValueError(
                f"positions mask must be a bool tensor [batch, seq], got {positions.dtype} of "
                f"shape {tuple(positions.shape)}"
            )
        return "mask", positions.detach().clone()  # the bank's own: later writes by the caller steer nothing
    raise TypeError(f"positions must be a string, an int token index or a bool tensor, got "
                    f"{type(positions).__name__}")


def as_coeff(coeff) -> torch.Tensor:
    """``coeff`` as a float32 CPU tensor: 0-d for one number (python, numpy or 0-d tensor),
    ``[rows]`` for per-row values (a sequence, numpy array or tensor)."""
    if isinstance(coeff, torch.Tensor):
        with_data(coeff, "coeff")
        if coeff.dtype == torch.bool or coeff.dtype.is_complex:
            raise TypeError(f"coeff must hold real numbers, got a {coeff.dtype} tensor")
        values = coeff.detach().to("cpu", torch.float32)
    elif isinstance(coeff, numbers.Real) and not isinstance(coeff, bool):  # numpy scalars too
        values = torch.tensor(float(coeff))
    elif hasattr(coeff, "__array__") and not isinstance(coeff, (str, bytes)):  # numpy arrays
        values = torch.as_tensor(_numpy_values(coeff, "coeff")).to(torch.float32)
    elif isinstance(coeff, Sequence) and not isinstance(coeff, (str, bytes)):
        values = torch.tensor([_real(c, "coeff") for c in coeff], dtype=torch.float32)
    else:
        raise TypeError(f"coeff must be a number, a sequence or a tensor, got {type(coeff).__name__}")
    if values.dim() > 1:
        raise ValueError(f"coeff must be a number or one value per row, got shape {tuple(values.shape)}")
    if values.dim() == 1 and values.numel() == 0:
        raise ValueError("coeff is empty: give one coefficient per row of the batch, or a single number")
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"coeff contains NaN or infinity, or a value beyond float32's range "
                         f"(|coeff| <= {FLOAT32_MAX:.3g}): give finite coefficients")
    return values


def _real(value, name: str) -> float:
    if isinstance(value, torch.Tensor):  # a 0-d (or one-element) real tensor is its number
        with_data(value, name)
        if value.numel() != 1 or value.dtype == torch.bool or value.dtype.is_complex:
            raise TypeError(f"{name} values must be numbers, got a {value.dtype} tensor of shape "
                            f"{tuple(value.shape)}")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} values must be numbers, got {type(value).__name__}")
    return float(value)


def _numpy_values(array, name: str):
    import numpy as np

    values = np.asarray(array)
    if values.dtype.kind not in "iuf":
        raise TypeError(f"{name} must hold integers or floats, got a numpy array of dtype {values.dtype}")
    return values.astype(np.float64) if values.dtype.kind == "f" else values.astype(np.int64)


def _is_index(value) -> bool:
    """An integer (any integral type, never a bool) or a one-element integer tensor with data."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and value.device.type != "meta" and not value.is_floating_point() \
            and not value.dtype.is_complex and value.dtype != torch.bool
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def as_slots(slots, count: int) -> torch.Tensor:
    """``slots`` as an int64 CPU tensor: 0-d for one index shared by every row (``None`` is
    vector 0), ``[rows]`` for per-row indices; each in ``-1..count-1``."""
    if slots is None:
        return torch.zeros((), dtype=torch.int64)
    if isinstance(slots, torch.Tensor):
        values = with_data(slots, "slots").detach().cpu()
    elif isinstance(slots, numbers.Integral) and not isinstance(slots, bool):  # numpy ints too
        values = torch.tensor(int(slots))
    elif hasattr(slots, "__array__") and not isinstance(slots, (str, bytes)):
        values = torch.as_tensor(_numpy_values(slots, "slots"))
    elif isinstance(slots, Sequence) and not isinstance(slots, (str, bytes)):
        if not all(_is_index(v) for v in slots):
            raise TypeError(f"slots must hold integers (indices into vectors, -1 = unsteered), got {list(slots)!r}")
        values = torch.tensor([int(v) for v in slots], dtype=torch.int64)
    else:
        raise TypeError(f"slots must be an integer, a sequence of integers or an integer tensor, got {type(slots).__name__}")
    if values.dim() > 1 or (values.numel() and (values.is_floating_point() or values.dtype == torch.bool)):
        raise ValueError(f"slots must be a 1-D sequence of integers, got {values.dtype} of shape {tuple(values.shape)}")
    values = values.to(torch.int64)
    if values.dim() == 1 and values.numel() == 0:
        raise ValueError("slots is empty: give one slot per row of the batch")
    if bool(((values < -1) | (values >= count)).any()):
        raise ValueError(f"slots must be in -1..{count - 1} (index into vectors, -1 = unsteered), got {values.tolist()}")
    return values


def copy_into(buffer: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The bank's own copy of ``values`` ``[rows]`` on ``buffer``'s device and dtype: ``buffer``
    itself when the size is unchanged (copied in place, so captured graphs see the new values),
    else a new tensor. Never ``values`` itself: a caller's CPU tensor (``coeff=torch.tensor(...)``
    on a CPU model) would otherwise be the bank's buffer, changed by the next ``set_batch`` and
    steering with whatever the caller later writes into it, past the checks."""
    if buffer.shape == values.shape:
        buffer.copy_(values, non_blocking=True)
        return buffer
    return values.to(device=buffer.device, dtype=buffer.dtype, memory_format=torch.contiguous_format,
                     copy=True)
