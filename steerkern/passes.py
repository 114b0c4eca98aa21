"""Which rows of a sweep run together: the passes of a batched score or generate.

A sweep has ``P`` prompts times ``A`` arms, one row each. Two facts decide how to cut it into
passes when it does not run as one:

- **A prompt's rows share work.** Its template prefix and the decoder layers below the lowest
  steered one run once for all its arms (:mod:`steerkern.prefill`, :mod:`steerkern.trunk`), so
  a pass holds whole prompts, every arm of each (prompt-major rows).
- **A pass is padded to its longest prompt.** A pass of short prompts next to one long prompt
  computes mostly padding, so prompts are sorted by length and each pass is a run of that
  order (:func:`steerkern.prefix_tree.pack_by_length`).

The plan has the fewest passes the caps allow and, among those, the fewest padded tokens. Caps:
``max_rows`` rows per pass (``batch_size``, or what fits memory: :mod:`steerkern.memory`) and
optionally ``max_tokens`` padded prompt tokens per pass, a soft cap (a speed preference, where
``max_rows`` is a limit): one prompt's ``A`` rows always fit in a pass under it. A prompt whose
``A`` rows alone exceed ``max_rows`` runs alone, its arms split into equal passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from steerkern.prefix_tree import pack_by_length


@dataclass(frozen=True)
class Pass:
    """Rows ``(arm, prompt)`` for ``prompt in prompts`` and ``arm in arms``, prompt-major."""

    prompts: tuple[int, ...]
    arms: range

    @property
    def rows(self) -> list[tuple[int, int]]:
        return [(arm, prompt) for prompt in self.prompts for arm in self.arms]


def plan_passes(lengths: list[int], arms: int, *, max_rows: int,
                max_tokens: int | None = None) -> list[Pass]:
    """The passes of a sweep of ``len(lengths)`` prompts (of ``lengths[p]`` tokens) times
    ``arms`` arms (see the module docstring).

    Args:
        lengths: ``[P]`` tokens of each prompt (>= 1).
        arms: ``A >= 1``.
        max_rows: most rows per pass (>= 1).
        max_tokens: most padded prompt tokens per pass (rows x the pass's longest prompt), or
            ``None``; one prompt's rows still make a pass when they alone exceed it.

    Returns:
        The passes, shortest prompts first; every ``(arm, prompt)`` row is in exactly one.
    """
    if arms < 1 or max_rows < 1:
        raise ValueError(f"arms and max_rows must be >= 1, got {arms} and {max_rows}")
    if arms <= max_rows:
        # prompts as units of `arms` rows; a cost per pass above any padding difference makes
        # the plan the fewest passes first, the fewest padded tokens second
        runs = pack_by_length(lengths, max_rows // arms,
                              pass_cost=len(lengths) * max(lengths, default=0) + 1,
                              max_tokens=None if max_tokens is None else max_tokens // arms)
        return [Pass(tuple(run), range(arms)) for run in runs]
    parts = math.ceil(arms / max_rows)
    step = math.ceil(arms / parts)
    return [Pass((prompt,), range(lo, min(lo + step, arms)))
            for prompt in sorted(range(len(lengths)), key=lambda p: lengths[p])
            for lo in range(0, arms, step)]
