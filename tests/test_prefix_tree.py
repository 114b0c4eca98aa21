"""The prefix-tree plan of a capture (steerkern.prefix_tree) and the capture that runs it:
every read lands on the right token, shared prefixes are computed once, and the activations
equal whole-text passes on every architecture."""

import itertools
import random

import pytest
import torch

from steerkern.capture import _prefix_plan, _tokenize, capture
from steerkern.models import resolve_module
from steerkern.prefix_tree import Segment, build_prefix_tree, pack_by_length, tree_tokens
from tests.test_extract import CharTokenizer
from tests.tiny_models import ARCHITECTURES, skip_unless_rows_can_share_a_cache


def paths(segments, prefix=()):
    """Every root-to-segment token path, with the segment."""
    for segment in segments:
        assert isinstance(segment, Segment) and segment.tokens
        assert segment.start == len(prefix)
        here = prefix + tuple(segment.tokens)
        yield here, segment
        yield from paths(segment.children, here)


def check_reads(seqs, reads, segments):
    """Each read (text, j) appears exactly once, on a path that is a prefix of the text, at the
    token the text's read position names."""
    seen = {}
    for path, segment in paths(segments):
        for text, j, offset in segment.reads:
            position = segment.start + offset
            assert (text, j) not in seen
            seen[(text, j)] = position
            assert position == reads[text][j]
            assert tuple(seqs[text][:position + 1]) == path[:position + 1]
    assert set(seen) == {(t, j) for t in range(len(seqs)) for j in range(len(reads[t]))}


def test_radix_tree_shares_prefixes_and_places_every_read():
    seqs = [[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3], [1, 2, 3, 4], [7, 8], [1, 2, 3, 4, 6, 6]]
    reads = [[len(s) - 1] for s in seqs]
    tree = build_prefix_tree(seqs, reads, min_saved=1)
    check_reads(seqs, reads, tree)
    assert [s.tokens for s in tree] == [[1, 2, 3], [7, 8]]
    assert sorted(c.tokens for c in tree[0].children) == [[4, 6, 6], [5]]  # no branch after 4
    # text 2 is a prefix of others: read inside the shared segment; texts 0 and 3 are equal and
    # a prefix of text 5: read inside its segment
    assert tree[0].reads == [(2, 0, 2)]
    four = next(c for c in tree[0].children if c.tokens[0] == 4)
    assert sorted(four.reads) == [(0, 0, 0), (3, 0, 0), (5, 0, 2)]
    assert tree_tokens(tree) == 3 + 3 + 1 + 2


def test_segments_that_save_little_merge_into_their_children():
    seqs = [[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3, 6]]
    reads = [[2, 3], [3], [0, 3]]
    kept = build_prefix_tree(seqs, reads, min_saved=6)  # 3 tokens x 2 extra children = 6
    assert [s.tokens for s in kept] == [[1, 2, 3]]
    merged = build_prefix_tree(seqs, reads, min_saved=7)
    assert sorted(s.tokens for s in merged) == sorted(seqs)
    for tree in (kept, merged):
        check_reads(seqs, reads, tree)
    assert tree_tokens(merged) == 12 and tree_tokens(kept) == 6


def test_depth_is_bounded_and_random_plans_read_the_right_tokens():
    rng = random.Random(0)
    for _ in range(40):
        vocab = rng.choice([2, 3, 5])
        seqs = [[rng.randrange(vocab) for _ in range(rng.randint(1, 14))] for _ in range(rng.randint(1, 25))]
        reads = [sorted(rng.sample(range(len(s)), rng.randint(1, len(s)))) for s in seqs]
        min_saved, max_depth = rng.choice([0, 1, 8]), rng.choice([1, 2, 3, 32])
        tree = build_prefix_tree(seqs, reads, min_saved=min_saved, max_depth=max_depth)
        check_reads(seqs, reads, tree)
        assert max(len(path) for path, _ in paths(tree)) <= max(len(s) for s in seqs)
        assert tree_depth(tree) <= max_depth
        distinct = len({tuple(s[:i]) for s in seqs for i in range(1, len(s) + 1)})
        assert tree_tokens(tree) >= distinct
        if min_saved == 0 and max_depth == 32:
            assert tree_tokens(tree) == distinct  # nothing merged: each prefix once


def test_bad_read_positions_are_rejected():
    with pytest.raises(ValueError, match="read position 3"):
        build_prefix_tree([[1, 2, 3]], [[3]])
    with pytest.raises(ValueError, match="max_depth"):
        build_prefix_tree([[1]], [[0]], max_depth=0)


def test_pack_by_length_is_optimal():
    rng = random.Random(1)
    for _ in range(30):
        lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 7))]
        rows, cost = rng.randint(1, 4), rng.choice([0, 5, 16])
        batches = pack_by_length(lengths, rows, cost)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        assert all(1 <= len(b) <= rows for b in batches)
        best = min(price(p, lengths, cost) for p in partitions(list(range(len(lengths))), rows))
        assert price(batches, lengths, cost) == best


def test_pack_by_length_with_a_token_budget_is_optimal():
    """``max_tokens`` caps each batch's padded tokens (a single longer row still gets a batch);
    the packing stays optimal among the partitions that respect it."""
    rng = random.Random(2)
    for _ in range(40):
        lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 7))]
        rows, cost, budget = rng.randint(1, 5), rng.choice([0, 5, 16, 10**4]), rng.randint(10, 90)

        def allowed(batch, lengths=lengths, budget=budget):
            return len(batch) <= max(1, budget // max(lengths[i] for i in batch))

        batches = pack_by_length(lengths, rows, cost, max_tokens=budget)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        assert all(1 <= len(b) <= rows and allowed(b) for b in batches)
        best = min(price(p, lengths, cost) for p in partitions(list(range(len(lengths))), rows)
                   if all(allowed(b) for b in p))
        assert price(batches, lengths, cost) == best


def tree_depth(segments):
    return 1 + max((tree_depth(s.children) for s in segments), default=0) if segments else 0


def price(batches, lengths, cost):
    """Padded tokens plus ``cost`` per pass."""
    return sum(cost + len(b) * max(lengths[i] for i in b) for b in batches)


def partitions(items, rows):
    """Every partition of ``items`` into blocks of at most ``rows`` (brute force)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for size in range(0, min(rows, len(items))):
        for others in itertools.combinations(rest, size):
            remaining = [i for i in rest if i not in others]
            for tail in partitions(remaining, rows):
                yield [[first, *others], *tail]


# --- capture over the plan -----------------------------------------------------------------------

TEXTS = [f"# {persona} persona speaking.\n{suffix}"
         for persona in ("a happy", "a sad", "an upbeat")
         for suffix in ("The weather is", "The weather is nice today", "I think that", "I think",
                        "Once upon a time there was")]
TEXTS += ["something else entirely", TEXTS[3], "# a happy"]


def count_tokens(model):
    """A pre-hook on the embeddings that counts the real tokens fed to the model."""
    seen = []
    handle = model.get_input_embeddings().register_forward_pre_hook(
        lambda module, args: seen.append(int(args[0].numel())))
    return seen, handle


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_shared_capture_equals_whole_text_passes(tiny_model_factory, arch):
    model = tiny_model_factory(arch)
    skip_unless_rows_can_share_a_cache(model)
    tok = CharTokenizer("right")
    whole = capture(model, tok, TEXTS, [1, 2], last_n_tokens=3, batch_size=4, progress=False,
                    share_prefixes=False, inputs=True)
    seen, handle = count_tokens(model)
    try:
        shared = capture(model, tok, TEXTS, [1, 2], last_n_tokens=3, batch_size=4, progress=False,
                         inputs=True)
    finally:
        handle.remove()
    for got, want in zip(shared, whole):
        for layer in (1, 2):
            assert not want[layer].isnan().any()
            torch.testing.assert_close(got[layer], want[layer], rtol=1e-5, atol=1e-5)
    total = sum(len(tok(t)["input_ids"]) for t in TEXTS)
    assert sum(seen) < 0.6 * total, "shared prefixes must be computed once"


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_texts_longer_than_the_sliding_window_run_whole(tiny_model_factory, arch):
    """The tiny Gemmas' window is 64 tokens: texts that fit it share their prefixes, longer
    ones run whole (a sliding-window cache drops columns), and both equal whole-text passes."""
    model = tiny_model_factory(arch)
    tok = CharTokenizer()
    long_texts = [t + " and then, after a long while, it rained all over the town" for t in TEXTS]
    for texts, shared in ((TEXTS, True), (long_texts, False)):
        ids = _tokenize(model, tok, texts)
        assert (_prefix_plan(model, ids, [[len(seq) - 1] for seq in ids]) is not None) == shared
        want = capture(model, tok, texts, [1, 3], progress=False, share_prefixes=False)
        got = capture(model, tok, texts, [1, 3], progress=False)
        for layer in (1, 3):
            torch.testing.assert_close(got[layer], want[layer], rtol=1e-5, atol=1e-5)


def test_shared_capture_of_a_sub_module_stops_early(tiny_model_factory):
    model = tiny_model_factory("llama")
    tok = CharTokenizer()
    calls = []
    handle = resolve_module(model, 3, "residual").register_forward_hook(lambda *a: calls.append(1))
    try:
        for target in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
            whole = capture(model, tok, TEXTS, [0, 2], target=target, last_n_tokens=2,
                            batch_size=3, progress=False, share_prefixes=False)
            shared = capture(model, tok, TEXTS, [0, 2], target=target, last_n_tokens=2,
                             batch_size=3, progress=False)
            for layer in (0, 2):
                torch.testing.assert_close(shared[layer], whole[layer], rtol=1e-5, atol=1e-5)
    finally:
        handle.remove()
    assert not calls


def test_shared_capture_on_the_default_model_matches_hidden_states(default_model):
    from steerkern.data import concept_pairs

    model, tok = default_model
    pairs = concept_pairs("sentiment", tok, max_suffixes=2, cuts=2)
    texts = [t for pair in pairs for t in pair][:12]
    seen, handle = count_tokens(model)
    try:
        got = capture(model, tok, texts, [4, 9], last_n_tokens=2, batch_size=8, progress=False)
    finally:
        handle.remove()
    ids = _tokenize(model, tok, texts)
    assert sum(seen) < 0.5 * sum(map(len, ids))
    with torch.no_grad():
        for i, seq in enumerate(ids):
            states = model(torch.tensor([seq]), output_hidden_states=True).hidden_states
            for layer in (4, 9):
                torch.testing.assert_close(got[layer][i], states[layer + 1][0, -2:], rtol=1e-4, atol=1e-4)


def test_shared_capture_on_an_offloaded_model(tiny_model_factory):
    """accelerate's CPU offload (weights on 'meta' between calls): capture, with or without
    the shared KV cache, equals the plain model's activations."""
    from accelerate import cpu_offload

    from tests.tiny_models import build_tiny_model

    offloaded = cpu_offload(build_tiny_model("llama"), execution_device=torch.device("cpu"))
    assert next(offloaded.model.layers[1].parameters()).device.type == "meta"
    tok = CharTokenizer()
    want = capture(tiny_model_factory("llama"), tok, TEXTS, [1, 3], last_n_tokens=2, progress=False,
                   share_prefixes=False)
    for share in (True, False):  # inputs go to the execution device, not to 'meta'
        got = capture(offloaded, tok, TEXTS, [1, 3], last_n_tokens=2, progress=False,
                      share_prefixes=share)
        for layer in (1, 3):
            torch.testing.assert_close(got[layer], want[layer], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["mean_diff", "pca_center", "lowrank", "weight_svd", "grad"])
def test_extract_with_and_without_shared_prefixes_agree(tiny_model_factory, method):
    from steerkern.extract import extract

    model = tiny_model_factory("qwen2")
    pairs = [(f"# a happy persona.\n{s}", f"# a sad persona.\n{s}")
             for s in ("The sky is", "The sky is blue", "I went home", "We often", "We often walk")]
    target = "mlp.down_proj" if method == "weight_svd" else "residual"
    vectors = [extract(model, CharTokenizer(), pairs, layers=[1, 2], method=method, rank=2,
                       target=target, last_n_tokens=2, progress=False, share_prefixes=share)
               for share in (True, False)]
    for key, part in vectors[0].parts.items():
        other = vectors[1].parts[key]
        for name in ("bias", "A", "B"):
            mine, theirs = getattr(part, name), getattr(other, name)
            assert (mine is None) == (theirs is None)
            if mine is not None:
                if name in ("A", "B"):  # a basis: compare the subspace it spans
                    mine, theirs = mine @ mine.T, theirs @ theirs.T
                torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
