"""Plan the forward passes of a capture so that every distinct token prefix is computed once.

Contrast data repeats itself at the token level. Persona pairs share the chat template and the
persona turn across every suffix; a suffix cut at several lengths makes the shorter texts
prefixes of the longer one; a CAA item's chosen and rejected texts share the whole question and
differ only in the answer token. In a causal model the hidden state at position ``p`` depends
only on tokens ``0..p``, so texts that share a prefix share its states, and a text that is a
prefix of another is read inside the longer one.

The plan is a radix tree over the token sequences: a :class:`Segment` is a run of tokens that
every text through it shares, and its children continue it. Running a segment's tokens on top of
its parent's KV cache gives exactly the states the full texts would have (up to float summation
order). Each read (text ``t``, its ``j``-th read position) is attached to the segment holding
that position.

A segment that saves little (``len(tokens) * (children - 1) < min_saved``: the tokens its
children would otherwise recompute) is merged into its children, which then start with its
tokens; so are all segments below ``max_depth`` levels. Merging trades a little recomputation
for fewer, fuller forward passes.

Cost: with ``n`` texts of ``L`` tokens, the tree has at most ``n L`` nodes, built in ``O(n L)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MIN_SAVED_TOKENS = 8
MAX_DEPTH = 32


@dataclass
class Segment:
    """A run of tokens shared by every text through it.

    Attributes:
        tokens: the segment's token ids.
        start: position of ``tokens[0]`` in the texts (the parent's end).
        children: segments continuing this one (each starts at ``start + len(tokens)``).
        reads: ``(text, j, offset)``: read ``j`` of text ``text`` is the state of
            ``tokens[offset]``.
    """

    tokens: list[int]
    start: int = 0
    children: list[Segment] = field(default_factory=list)
    reads: list[tuple[int, int, int]] = field(default_factory=list)


def build_prefix_tree(seqs: list[list[int]], read_positions: list[list[int]], *,
                      min_saved: int = MIN_SAVED_TOKENS, max_depth: int = MAX_DEPTH) -> list[Segment]:
    """The radix-tree plan of ``seqs`` (see the module docstring).

    Args:
        seqs: token ids of each text (non-empty).
        read_positions: for text ``t``, the positions ``0 <= p < len(seqs[t])`` to read.
        min_saved: a segment is kept only if it saves at least this many token computations.
        max_depth: segments deeper than this many levels are merged into their descendants.

    Returns:
        The top-level segments (a forest: texts need not share a first token).
    """
    if max_depth < 1:
        raise ValueError(f"max_depth must be >= 1, got {max_depth}")
    root: dict = {}  # token -> [children: dict, reads: [(text, j)]]
    for text, (seq, positions) in enumerate(zip(seqs, read_positions)):
        wanted: dict[int, list[int]] = {}
        for j, position in enumerate(positions):
            if not 0 <= position < len(seq):
                raise ValueError(f"read position {position} is outside text {text} of {len(seq)} tokens")
            wanted.setdefault(position, []).append(j)
        node = root
        for position, token in enumerate(seq):
            entry = node.get(token)
            if entry is None:
                entry = node[token] = [{}, []]
            entry[1].extend((text, j) for j in wanted.get(position, ()))
            node = entry[0]
    return _merge(_compress(root), min_saved, max_depth)


def _compress(root: dict) -> list[Segment]:
    """Trie -> radix tree: chains of single-child nodes become one segment."""
    top: list[Segment] = []
    stack = [(root, 0, top)]  # (trie node whose children start segments, their start, where to append)
    while stack:
        node, start, into = stack.pop()
        for token, entry in node.items():
            segment = Segment([], start)
            while True:  # follow the chain of single children from this token
                kids, reads = entry
                segment.reads.extend((text, j, len(segment.tokens)) for text, j in reads)
                segment.tokens.append(token)
                if len(kids) != 1:
                    break
                ((token, entry),) = kids.items()
            into.append(segment)
            if kids:
                stack.append((kids, start + len(segment.tokens), segment.children))
    return top


def _merge(segments: list[Segment], min_saved: int, max_depth: int, depth: int = 0) -> list[Segment]:
    """Merge segments that save too little (or lie too deep) into their children."""
    kept = []
    pending = list(reversed(segments))
    while pending:
        segment = pending.pop()
        children = segment.children
        if children and (depth >= max_depth - 1
                         or len(segment.tokens) * (len(children) - 1) < min_saved):
            shift = len(segment.tokens)
            for i, child in enumerate(children):
                child.tokens = segment.tokens + child.tokens
                child.start = segment.start
                child.reads = ([(t, j, o + shift) for t, j, o in child.reads]
                               + (segment.reads if i == 0 else []))
            pending.extend(reversed(children))
            continue
        segment.children = _merge(children, min_saved, max_depth, depth + 1)
        kept.append(segment)
    return kept


def tree_tokens(segments: list[Segment]) -> int:
    """Tokens the plan computes (without padding)."""
    total, stack = 0, list(segments)
    while stack:
        segment = stack.pop()
        total += len(segment.tokens)
        stack.extend(segment.children)
    return total


PASS_COST_TOKENS = 16


def pack_by_length(lengths: list[int], max_rows: int, pass_cost: float = PASS_COST_TOKENS,
                   max_tokens: int | None = None) -> list[list[int]]:
    """Batches of indices into ``lengths`` for left-padded forward passes, minimising the padded
    tokens ``sum_b rows_b * max_len_b`` plus ``pass_cost`` token-equivalents per pass, with at
    most ``max_rows`` rows each and, given ``max_tokens``, at most ``max(1, max_tokens //
    max_len_b)`` rows (padded tokens ``rows_b * max_len_b <= max_tokens`` unless one row alone
    exceeds it). Exact: a batch holds a contiguous run of the length-sorted order in some
    optimal packing, so a dynamic program over that order finds one in ``O(n max_rows)``
    (vectorised over the batch's first index).
    The sort is stable: indices of equal lengths keep their order."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best = np.zeros(n + 1)  # best[i]: cost of packing the i shortest
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        width = lengths[order[end - 1]]
        rows = max_rows if max_tokens is None else min(max_rows, max(1, max_tokens // max(width, 1)))
        begin = max(0, end - rows)
        # the batch order[b:end] for every b >= begin, at once (argmin: the first best)
        costs = best[begin:end] + pass_cost + (end - np.arange(begin, end)) * float(width)
        pick = int(np.argmin(costs))
        best[end], cut[end] = costs[pick], begin + pick
    batches, end = [], n
    while end > 0:
        batches.append(order[cut[end]:end])
        end = cut[end]
    return batches[::-1]


def padded_length_bound(segments: list[Segment]) -> int:
    """An upper bound on the columns (real and padding) of any row's KV cache when the plan runs
    with each pass left-padded to its longest segment: the sum over tree levels of the longest
    segment at that level."""
    total, level = 0, segments
    while level:
        total += max(len(segment.tokens) for segment in level)
        level = [child for segment in level for child in segment.children]
    return total
