"""Checks of count arguments (batch sizes, token counts, ranks, steps) shared by the public API."""

import numbers


def count(value, name: str, *, minimum: int = 1, optional: bool = False, meaning: str = "") -> int | None:
    """``value`` as a Python ``int >= minimum`` (any integral type: numpy and other integer
    scalars too, never a bool), or ``None`` when ``optional`` and ``value`` is ``None``.

    Raises:
        ValueError: naming ``name``, what it must be (``meaning`` adds what ``None`` or the
            minimum stands for, e.g. ``" (None: one batch)"``) and what it got.
    """
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {kind}{' or None' if optional else ''}{meaning}, got {value!r}")
    return int(value)
