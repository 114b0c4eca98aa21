"""steer() and SteeringBank inside forward passes and generate (SPEC section 5)."""

import random

import pytest
import torch

from steerkern.control import SteeringBank, steer
from steerkern.models import decoder_layers, resolve_module
from steerkern.vectors import SteeringVector
from tests.hooks import steerkern_hook_count
from tests.tiny_models import ARCHITECTURES

MOE = ("mixtral", "qwen2_moe")




def random_vector(model, layers, seed, scale=1.0, target="residual"):
    gen = torch.Generator().manual_seed(seed)
    width = resolve_module(model, layers[0], target).weight.shape[0] if target != "residual" else (
        model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd)
    return SteeringVector.from_directions(
        {layer: scale * torch.randn(width, generator=gen) for layer in layers}, target=target)


def lowrank_vector(model, layer, seed, rank=3, width=64):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(width, rank, generator=gen) / width**0.5
    B = torch.randn(width, rank, generator=gen)
    bias = torch.randn(width, generator=gen)
    return SteeringVector.from_lowrank({layer: (bias, A, B)})


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_per_row_vectors_match_rows_run_alone(arch, tiny_model_factory):
    model = tiny_model_factory(arch)
    vectors = [random_vector(model, [1], 1), random_vector(model, [1, 2], 2),
               lowrank_vector(model, 2, 3)]
    ids = torch.randint(3, 100, (4, 7), generator=torch.Generator().manual_seed(0))
    slots, coeffs = [0, 1, -1, 2], [2.0, -1.5, 3.0, 0.7]
    with torch.no_grad():
        base = model(ids).logits
        with steer(model, vectors, slots=slots, coeff=coeffs):
            batched = model(ids).logits
        for row, (slot, coeff) in enumerate(zip(slots, coeffs)):
            if slot < 0:
                if arch in MOE:  # expert matmuls group tokens of other rows: not bitwise
                    torch.testing.assert_close(batched[row], base[row], atol=1e-6, rtol=1e-6)
                else:
                    assert torch.equal(batched[row], base[row])  # unsteered rows: bitwise
                continue
            with steer(model, vectors[slot], coeff=coeff):
                alone = model(ids[row:row + 1]).logits[0]
            torch.testing.assert_close(batched[row], alone, atol=1e-5, rtol=1e-5)
            assert (alone - base[row]).abs().max() > 1e-3  # the vector did something
    assert steerkern_hook_count(model) == 0


def test_default_model_per_row_batch_equals_single_rows(default_model):
    model, tokenizer = default_model
    gen = torch.Generator().manual_seed(0)
    vectors = [SteeringVector.from_directions({layer: 2 * torch.randn(576, generator=gen) for layer in (8, 12)})
               for _ in range(3)]
    prompts = ["I think that", "The weather today is quite", "Tell me a story about", "Hi"]
    slots, coeffs = [0, 1, 2, -1], [1.0, -1.0, 2.0, 1.0]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        plain_batch = model(**batch).logits[:, -1]
        with steer(model, vectors, slots=slots, coeff=coeffs):
            steered = model(**batch).logits[:, -1]
        for row, prompt in enumerate(prompts):
            single = tokenizer([prompt], return_tensors="pt")
            plain_single = model(**single).logits[0, -1]
            padding_error = (plain_batch[row] - plain_single).abs().max().item()
            if slots[row] < 0:
                assert torch.equal(steered[row], plain_batch[row])
                continue
            with steer(model, vectors[slots[row]], coeff=coeffs[row]):
                alone = model(**single).logits[0, -1]
            assert (steered[row] - alone).abs().max().item() <= max(1e-4, 3 * padding_error)


def test_coefficient_zero_equals_unsteered(tiny_model_factory):
    model = tiny_model_factory("qwen2")
    ids = torch.randint(3, 100, (2, 5))
    with torch.no_grad():
        base = model(ids).logits
        with steer(model, random_vector(model, [0, 1, 2], 0), coeff=0.0):
            assert torch.equal(model(ids).logits, base)


def test_prompt_and_generated_positions_under_the_kv_cache(default_model):
    model, tokenizer = default_model
    vector = SteeringVector.from_directions({10: 8 * torch.randn(576, generator=torch.Generator().manual_seed(1))})
    batch = tokenizer(["Once upon a time", "My favourite food is"], return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True,
                  pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        plain = model.generate(**batch, **kwargs)
        with steer(model, vector, coeff=1.0, positions="generated"):
            gen_only = model.generate(**batch, **kwargs)
        with steer(model, vector, coeff=1.0, positions="prompt"):
            prompt_only = model.generate(**batch, **kwargs)
        with steer(model, vector, coeff=1.0, positions="all"):
            everywhere = model.generate(**batch, **kwargs)
    # "generated": the prompt pass is untouched, so the first token's scores equal the plain run.
    assert torch.equal(gen_only.scores[0], plain.scores[0])
    assert not torch.equal(gen_only.scores[1], plain.scores[1])
    # "prompt": steers the prefill only; "all" steers the first step the same way.
    assert torch.equal(prompt_only.scores[0], everywhere.scores[0])
    assert not torch.equal(prompt_only.scores[0], plain.scores[0])
    # "prompt" leaves decode steps alone: one forward pass over the whole generated sequence,
    # steering only the prompt's positions through an explicit mask, predicts the same tokens.
    sequence = prompt_only.sequences
    prompt_len = batch["input_ids"].shape[1]
    attention = torch.cat([batch["attention_mask"],
                           torch.ones(2, sequence.shape[1] - prompt_len, dtype=torch.long)], 1)
    only_prompt = torch.zeros_like(sequence, dtype=torch.bool)
    only_prompt[:, :prompt_len] = True
    with torch.no_grad(), steer(model, vector, coeff=1.0, positions=only_prompt):
        replay = model(sequence, attention_mask=attention).logits
    assert torch.equal(replay[:, prompt_len - 1:-1].argmax(-1), sequence[:, prompt_len:])


def test_explicit_position_mask(tiny_model_factory):
    model = tiny_model_factory("llama")
    ids = torch.randint(3, 100, (2, 6))
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 4:] = True  # steer only the last two tokens of row 0
    vector = random_vector(model, [3], 0, scale=5.0)  # last layer: earlier positions unaffected
    with torch.no_grad():
        base = model(ids).logits
        with steer(model, vector, positions=mask):
            out = model(ids).logits
    assert torch.equal(out[1], base[1]) and torch.equal(out[0, :4], base[0, :4])
    assert not torch.equal(out[0, 4:], base[0, 4:])


def test_ablation_removes_the_direction(tiny_model_factory):
    model = tiny_model_factory("llama")
    u = torch.randn(64)
    u = u / u.norm()
    ablate = SteeringVector.from_lowrank({layer: (None, u[:, None], -u[:, None]) for layer in (1, 2)})
    seen = []
    handles = [decoder_layers(model)[layer].register_forward_hook(
        lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out).clone()))
        for layer in (1, 2)]
    try:
        with torch.no_grad(), steer(model, ablate, coeff=1.0):
            model(torch.randint(3, 100, (2, 5)))
    finally:
        for handle in handles:
            handle.remove()
    # Our hooks were registered after the user's, so the user's hooks saw the unsteered output:
    # read the steered outputs again through a hook registered after steering.
    with torch.no_grad(), steer(model, ablate, coeff=1.0):
        outputs = []
        handles = [decoder_layers(model)[layer].register_forward_hook(
            lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
            for layer in (1, 2)]
        try:
            model(torch.randint(3, 100, (2, 5)))
        finally:
            for handle in handles:
                handle.remove()
    for hidden in outputs:
        assert (hidden @ u).abs().max() < 1e-5
    assert any((h @ u).abs().max() > 1e-2 for h in seen)


def test_sub_module_and_weight_delta_targets(tiny_model_factory):
    model = tiny_model_factory("llama")
    ids = torch.randint(3, 100, (2, 5))
    with torch.no_grad():
        base = model(ids).logits
        vector = random_vector(model, [1], 0, target="mlp.down_proj")
        with steer(model, vector, coeff=1.0):
            assert not torch.equal(model(ids).logits, base)
        # A low-rank weight delta on mlp.down_proj (source = module input) equals adding B A^T
        # to the weight.
        down = resolve_module(model, 1, "mlp.down_proj")
        A = 0.1 * torch.randn(96, 2)
        B = 0.1 * torch.randn(64, 2)
        delta = SteeringVector.from_lowrank({1: (None, A, B)}, target="mlp.down_proj", source="input")
        with steer(model, delta, coeff=1.0):
            steered = model(ids).logits
        original = down.weight.clone()
        down.weight += B @ A.T
        try:
            merged = model(ids).logits
        finally:
            down.weight.copy_(original)
    torch.testing.assert_close(steered, merged, atol=1e-5, rtol=1e-5)


def test_padding_sides_give_the_unpadded_generations(default_model):
    model, tokenizer = default_model
    gen = torch.Generator().manual_seed(2)
    vectors = [SteeringVector.from_directions({12: 6 * torch.randn(576, generator=gen)}) for _ in range(2)]
    prompts = ["The capital of France is", "Write a poem about the sea and"]
    slots, coeffs = [0, 1], [1.0, 1.0]
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    singles = []
    with torch.no_grad():
        for prompt, slot, coeff in zip(prompts, slots, coeffs):
            single = tokenizer([prompt], return_tensors="pt")
            with steer(model, vectors[slot], coeff=coeff):
                out = model.generate(**single, **kwargs)
            singles.append(out[0, single["input_ids"].shape[1]:].tolist())
        left = tokenizer(prompts, return_tensors="pt", padding=True)
        with steer(model, vectors, slots=slots, coeff=coeffs):
            out = model.generate(**left, **kwargs)
        assert out[:, left["input_ids"].shape[1]:].tolist() == singles
        # Right padding: a single forward pass; each row's last real token gives the first
        # generated token of the unpadded run, and pad positions are left alone.
        tokenizer.padding_side = "right"
        try:
            right = tokenizer(prompts, return_tensors="pt", padding=True)
        finally:
            tokenizer.padding_side = "left"
        with steer(model, vectors, slots=slots, coeff=coeffs):
            logits = model(**right).logits
        last = right["attention_mask"].sum(1) - 1
        first_tokens = logits[torch.arange(2), last].argmax(-1).tolist()
        assert first_tokens == [s[0] for s in singles]


def test_num_return_sequences_and_beams_follow_rows(default_model):
    model, tokenizer = default_model
    gen = torch.Generator().manual_seed(3)
    vectors = [SteeringVector.from_directions({12: 6 * torch.randn(576, generator=gen)}) for _ in range(2)]
    prompts = ["The best way to learn is", "Yesterday I went to"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=4, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        with steer(model, vectors, slots=[0, 1], coeff=[1.0, 1.0]):
            beams = model.generate(**batch, num_beams=2, num_return_sequences=2, do_sample=False, **kwargs)
        for row in range(2):
            with steer(model, vectors[row], coeff=1.0):
                alone = model.generate(**{k: v[row:row + 1] for k, v in batch.items()}, num_beams=2,
                                       num_return_sequences=2, do_sample=False, **kwargs)
            assert beams[2 * row:2 * row + 2].tolist() == alone.tolist()
        torch.manual_seed(0)
        with steer(model, vectors, slots=[0, -1], coeff=[1.0, 1.0]):
            sampled = model.generate(**batch, do_sample=True, num_return_sequences=3, **kwargs)
    assert sampled.shape[0] == 6


def test_nested_contexts_add_up(tiny_model_factory):
    model = tiny_model_factory("mistral")
    ids = torch.randint(3, 100, (2, 5))
    v = random_vector(model, [1], 0)
    w = random_vector(model, [1], 1)
    with torch.no_grad():
        with steer(model, v, coeff=1.0), steer(model, w, coeff=2.0):
            nested = model(ids).logits
        with steer(model, v + 2 * w, coeff=1.0):
            summed = model(ids).logits
    torch.testing.assert_close(nested, summed, atol=1e-5, rtol=1e-5)


def test_a_context_from_another_thread_is_refused_while_one_steers(tiny_model_factory):
    """Hooks act on every pass of the model whichever thread runs it: a second thread's
    steer() on a steered model would steer both threads' passes (here thread 2's unsteered
    logits came out steered by thread 1's vector), so it is refused; the model is free for
    it once the first context exits, and nesting within one thread still composes."""
    import threading

    model = tiny_model_factory("llama")
    v = random_vector(model, [1], 0)
    ids = torch.randint(3, 100, (1, 5))
    entered, release, results = threading.Event(), threading.Event(), []

    def first():
        with steer(model, v, coeff=3.0):
            entered.set()
            release.wait(30)

    worker = threading.Thread(target=first)
    worker.start()
    try:
        assert entered.wait(30)
        with pytest.raises(RuntimeError, match="already steered by a context entered in another thread"):
            with steer(model, -v, coeff=1.0):
                pass
    finally:
        release.set()
        worker.join(30)
    assert steerkern_hook_count(model) == 0
    with torch.no_grad(), steer(model, v, coeff=1.0), steer(model, v, coeff=1.0):
        nested = model(ids).logits

    def second():
        try:
            with steer(model, v, coeff=2.0), torch.no_grad():
                results.append(model(ids).logits)
        except Exception as error:  # noqa: BLE001 - reported below
            results.append(error)

    worker = threading.Thread(target=second)
    worker.start()
    worker.join(30)
    torch.testing.assert_close(results[0], nested)


def test_no_hook_survives_random_enter_exit_raise_cycles(tiny_model_factory):
    model = tiny_model_factory("llama")
    vectors = [random_vector(model, [0, 2], s) for s in range(3)]
    baseline = steerkern_hook_count(model)
    rng = random.Random(0)

    class Boom(Exception):
        pass

    def run(depth):
        with steer(model, vectors[rng.randrange(3)], coeff=rng.uniform(-2, 2)):
            roll = rng.random()
            if roll < 0.3:
                raise Boom
            if roll < 0.6 and depth < 3:
                run(depth + 1)

    for _ in range(1000):
        try:
            run(0)
        except Boom:
            pass
    assert steerkern_hook_count(model) == baseline


def test_bad_input_leaves_the_model_as_it_was(tiny_model_factory):
    model = tiny_model_factory("llama")
    good = random_vector(model, [1], 0)
    before = steerkern_hook_count(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    wrong_width = SteeringVector.from_directions({1: torch.randn(65)})
    cases = [
        (dict(vectors=wrong_width), "65"),
        (dict(vectors=SteeringVector.from_directions({9: torch.randn(64)})), "layer"),
        (dict(vectors=good, coeff=float("nan")), "NaN"),
        (dict(vectors=good, coeff=float("inf")), "NaN or infinity"),
        (dict(vectors=good, coeff=1e39), "beyond float32's range"),
        (dict(vectors=[good], slots=[0, 0], coeff=[1.0, -1e39]), "beyond float32's range"),
        (dict(vectors=[good, good], slots=[0, 1, 2]), "slots"),
        (dict(vectors=[good], slots=[0, 0], coeff=[1.0, 2.0, 3.0]), "coeff has 3 rows"),
        (dict(vectors=good, positions="middle"), "positions"),
        (dict(vectors=[]), "vectors is empty"),
        (dict(vectors=[good, "nope"]), "vectors\\[1\\]"),
    ]
    for kwargs, message in cases:
        vectors = kwargs.pop("vectors")
        with pytest.raises((ValueError, TypeError), match=message):
            with steer(model, vectors, **kwargs):
                pass
        assert steerkern_hook_count(model) == before
    # Per-row lengths that do not match the batch fail at the forward pass; hooks still go away.
    with pytest.raises(ValueError, match="the batch has 3 rows"):
        with steer(model, [good], slots=[0, 0], coeff=1.0):
            model(torch.randint(3, 100, (3, 4)))
    assert steerkern_hook_count(model) == before
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name])


def test_bank_set_batch_reuses_device_buffers(tiny_model_factory):
    model = tiny_model_factory("llama")
    bank = SteeringBank(model, [random_vector(model, [1], s) for s in range(4)])
    bank.set_batch(slots=[0, 1, 2], coeff=[1.0, 2.0, 3.0])
    slot_buffer, coeff_buffer = bank._row_slot, bank._row_coeff
    bank.set_batch(slots=[3, -1, 0], coeff=[0.5, 0.0, -1.0])
    assert bank._row_slot is slot_buffer and bank._row_coeff is coeff_buffer
    assert slot_buffer.tolist() == [3, -1, 0]
    ids = torch.randint(3, 100, (3, 4))
    with torch.no_grad(), bank.attached():
        first = model(ids).logits
        bank.set_batch(slots=[0, 1, 2], coeff=[1.0, 2.0, 3.0])
        second = model(ids).logits
    assert not torch.equal(first, second)
    assert steerkern_hook_count(model) == 0


def test_bank_keeps_its_own_copy_of_a_callers_tensors(tiny_model_factory):
    """Per-row ``slots`` / ``coeff`` given as CPU tensors (a CPU model) are copied: the next
    ``set_batch`` does not write into the caller's tensor, and what the caller writes into it
    later steers nothing (steering is what a list of the same values gives); so for a
    ``positions`` mask."""
    model = tiny_model_factory("llama")
    vector = random_vector(model, [1], 0)
    ids = torch.randint(3, 100, (2, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with steer(model, vector, coeff=[2.0, -1.0]):
            want = model(ids).logits
        coeff, slots = torch.tensor([2.0, -1.0]), torch.tensor([0, 0])
        with steer(model, [vector], slots=slots, coeff=coeff) as bank:
            coeff.mul_(0.0)
            slots.fill_(-1)
            got = model(ids).logits
            bank.set_batch(slots=[0, -1], coeff=torch.tensor([0.5, 3.0]))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert coeff.tolist() == [0.0, 0.0] and slots.tolist() == [-1, -1]
        bank = SteeringBank(model, vector)
        mine = torch.tensor([1.0, 2.0])
        bank.set_batch(coeff=mine)
        bank.set_batch(coeff=torch.tensor([5.0, 6.0]))
        assert mine.tolist() == [1.0, 2.0] and bank._row_coeff.tolist() == [5.0, 6.0]
        where = torch.zeros(2, 4, dtype=torch.bool)
        where[:, 2:] = True
        with steer(model, vector, coeff=2.0, positions=where.clone()):
            want = model(ids).logits
        with steer(model, vector, coeff=2.0, positions=where):
            where.fill_(True)
            got = model(ids).logits
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_gradients_flow_through_steering(tiny_model_factory):
    model = tiny_model_factory("llama")
    bias = torch.zeros(64, requires_grad=True)
    vector = SteeringVector.from_directions({1: bias})
    bank = SteeringBank(model, vector)
    for site in bank.sites:
        site.bias = site.bias.detach().requires_grad_(True)
    bank.set_batch(coeff=1.0)
    with bank.attached():
        loss = model(torch.randint(3, 100, (2, 5))).logits.square().mean()
    # autograd.grad, not backward(): the shared tiny model's parameters must get no .grad
    (grad,) = torch.autograd.grad(loss, bank.sites[0].bias)
    assert grad.abs().sum() > 0


def test_torch_compile_no_graph_break_and_no_recompile_on_new_coefficients(tiny_model_factory):
    import torch._dynamo as dynamo
    from torch._dynamo.testing import CompileCounter

    model = tiny_model_factory("llama")
    ids = torch.randint(3, 100, (2, 5))
    vectors = [random_vector(model, [1], 0), lowrank_vector(model, 2, 1)]
    bank = SteeringBank(model, vectors)
    bank.set_batch(slots=[0, 1], coeff=[1.0, 2.0])

    def forward(ids):
        return model(ids).logits

    def break_sites(explanation):
        return {(f.filename, f.lineno) for reason in explanation.break_reasons
                for f in reason.user_stack[-1:]}

    dynamo.reset()
    with torch.no_grad():
        plain = dynamo.explain(forward)(ids)
    dynamo.reset()
    with torch.no_grad(), bank.attached():
        explanation = dynamo.explain(forward)(ids)
        if plain.graph_break_count == 0:
            assert explanation.graph_break_count == 0
        else:  # some transformers releases break the graph themselves (4.55: cache creation)
            assert break_sites(explanation) == break_sites(plain)
        counter = CompileCounter()
        compiled = torch.compile(forward, backend=counter, dynamic=False)
        first = compiled(ids)
        frames = counter.frame_count
        bank.set_batch(slots=[1, -1], coeff=[-3.0, 0.5])
        second = compiled(ids)
        assert counter.frame_count == frames  # new slots and coefficients: no recompilation
        eager = forward(ids)
    torch.testing.assert_close(second, eager)
    assert not torch.equal(first, second)
    dynamo.reset()


def test_offloaded_model_steers_on_the_execution_device(tiny_model_factory):
    """accelerate's offloading keeps weights on 'meta' between calls; the bank takes the
    execution device from the dispatch hooks and steers exactly as on the plain model."""
    from accelerate import cpu_offload

    from tests.tiny_models import build_tiny_model

    plain = tiny_model_factory("llama")
    offloaded = cpu_offload(build_tiny_model("llama"), execution_device=torch.device("cpu"))
    assert next(offloaded.model.layers[1].parameters()).device.type == "meta"
    vectors = [random_vector(plain, [1, 2], 0), lowrank_vector(plain, 2, 1)]
    ids = torch.randint(3, 100, (2, 6))
    results = []
    for model in (plain, offloaded):
        bank = SteeringBank(model, vectors)
        assert {site.device.type for site in bank.sites} == {"cpu"}
        bank.set_batch(slots=[0, 1], coeff=[2.0, -1.5])
        with torch.no_grad(), bank.attached():
            results.append(model(ids).logits)
        assert steerkern_hook_count(model) == 0
    torch.testing.assert_close(results[1], results[0])
    with torch.no_grad():
        assert not torch.allclose(offloaded(ids).logits, results[1])


def test_past_length_without_a_mask():
    """Where a pass without an attention mask starts: legacy tuple caches, ``cache_position``,
    and a recurrent cache (no sequence length) counted per cache object."""
    import weakref

    from steerkern.pass_state import past_length as _past_length

    keys = torch.zeros(2, 2, 5, 4)
    seen = weakref.WeakKeyDictionary()
    assert _past_length({"past_key_values": ((keys, keys),)}, None, 1, seen) == 5
    assert int(_past_length({"cache_position": torch.tensor([7, 8])}, None, 2, seen)) == 7
    assert _past_length({}, None, 3, seen) == 0

    class Layer:
        has_previous_state = {0: False}

    class Recurrent:
        layers = [Layer()]

        def get_seq_length(self):
            raise ValueError("no sequence length")

    cache = Recurrent()
    assert _past_length({"cache": cache}, None, 6, seen) == 0  # prefill: no state yet
    Layer.has_previous_state = {0: True}
    assert _past_length({"cache": cache}, None, 1, seen) == 6
    assert _past_length({"cache": cache}, None, 1, seen) == 7


def _first_scores(model, vector, positions, **kwargs):
    """The first generated token's scores under ``steer(model, vector, positions=...)``
    (``vector=None``: unsteered); a ``cache`` in ``kwargs`` is copied first."""
    import copy

    kwargs = {key: copy.deepcopy(value) if key in ("cache", "past_key_values") else value
              for key, value in kwargs.items()}
    run = dict(max_new_tokens=2, do_sample=False, pad_token_id=0, eos_token_id=None,
               output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        if vector is None:
            return model.generate(**kwargs, **run).scores[0]
        with steer(model, vector, coeff=1.0, positions=positions):
            return model.generate(**kwargs, **run).scores[0]


def test_positions_when_generate_continues_a_cache_or_prefills_in_chunks(tiny_model_factory):
    """A conversation continued from an earlier generate's cache, and generate's chunked
    prefill, run prompt tokens on top of a non-empty cache: they are prompt, not generated.
    (A last chunk of one token cannot be told from a decode step: see steerkern.control.)"""
    from transformers import GenerationConfig

    from steerkern.kvcache import cache_argument

    model = tiny_model_factory("llama")
    vector = random_vector(model, [1, 2], 0, scale=4.0)
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        first = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0,
                               eos_token_id=None, return_dict_in_generate=True)
    turn = torch.cat([first.sequences, torch.randint(3, 100, (2, 4))], dim=1)
    cache = getattr(first, "cache", None) or first.past_key_values
    continued = {"input_ids": turn, "attention_mask": torch.ones_like(turn), cache_argument(model): cache}
    cases = [continued]
    if hasattr(GenerationConfig(), "prefill_chunk_size"):  # 13 tokens: chunks of 5, 5 and 3
        cases.append(dict(input_ids=turn, attention_mask=torch.ones_like(turn), prefill_chunk_size=5))
    for kwargs in cases:
        plain = _first_scores(model, None, None, **kwargs)
        everywhere = _first_scores(model, vector, "all", **kwargs)
        assert torch.equal(_first_scores(model, vector, "generated", **kwargs), plain)
        torch.testing.assert_close(_first_scores(model, vector, "prompt", **kwargs), everywhere)
        assert not torch.allclose(everywhere, plain)


def _left_padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` ``[3, 9]``: rows 0 and 2 left-padded by 3 and 1 with pad id 0, whose
    embedding row is zero in the tiny models, so are the pads' keys."""
    ids = torch.randint(3, 100, (3, 9), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :1] = 0
    ids[mask == 0] = 0
    return ids, mask


def test_positions_under_a_static_cache_with_left_padding(tiny_model_factory):
    """With ``cache_implementation="static"`` generate passes a 4-D mask, so the cache length
    comes from elsewhere: transformers 4.5x's static ``get_seq_length`` counts the non-zero keys
    of row 0, which fall short of the prompt when row 0 is left-padded, and decode steps were
    taken for prompt tokens (left unsteered under "generated"). Every setting must give what
    the dynamic cache gives, ``positions=k`` too (each row's real tokens counted from the
    generate call's own 2-D mask, since the model gets no 2-D mask to count them in)."""
    model = tiny_model_factory("llama")
    vector = random_vector(model, [1, 2], 0, scale=4.0)
    ids, mask = _left_padded_batch()
    run = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)

    def tokens(positions, **extra):
        with torch.no_grad():
            if positions is None:
                return model.generate(input_ids=ids, attention_mask=mask, **run, **extra)
            with steer(model, vector, coeff=1.0, positions=positions):
                return model.generate(input_ids=ids, attention_mask=mask, **run, **extra)

    plain = tokens(None)
    for positions in ("all", "prompt", "generated", 4, 11):  # k: the 4-D mask names no pads
        assert torch.equal(tokens(positions, cache_implementation="static"), tokens(positions)), positions
    assert not torch.equal(tokens("generated"), plain)


def test_token_index_positions_under_a_static_cache_with_an_inferred_mask(tiny_model_factory):
    """Left-padded ``input_ids`` given without an attention mask: generate infers the mask from
    ``pad_token_id``. Under a static cache the passes get only a 4-D mask, so ``positions=k``
    must count each row's real tokens from the mask generate inferred (it counted the pads),
    giving what the dynamic cache and an explicit mask give."""
    model = tiny_model_factory("llama")
    vector = random_vector(model, [1, 2], 0, scale=4.0)
    ids, mask = _left_padded_batch()
    run = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=2,
               output_scores=True, return_dict_in_generate=True)

    def generate(**extra):
        with torch.no_grad(), steer(model, vector, coeff=[1.0, -1.5, 2.0], positions=4):
            return model.generate(input_ids=ids, **run, **extra)

    explicit = generate(attention_mask=mask, cache_implementation="static")
    for extra in ({}, {"cache_implementation": "static"}, {"cache_implementation": "static", "num_beams": 2}):
        got = generate(**extra)
        want = generate(attention_mask=mask, **extra)
        assert torch.equal(got.sequences, want.sequences), extra
        for ours, theirs in zip(got.scores, want.scores):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(generate(cache_implementation="static").scores[0], explicit.scores[0])
    assert steerkern_hook_count(model) == 0


def test_positional_attention_mask_keeps_pads_unsteered(tiny_model_factory):
    """``model(ids, mask)``: the mask is read from the positional arguments (their order is the
    architecture's own and the release's: GPT-2 takes the cache second, and in transformers
    4.53 also ``cache_position`` before the mask)."""
    import inspect

    def call(model, ids, mask):
        names = list(inspect.signature(model.forward).parameters)
        args = [None] * names.index("attention_mask")
        args[names.index("input_ids")] = ids
        return model(*args, mask)

    for arch in ("llama", "gpt2"):
        model = tiny_model_factory(arch)
        vector = random_vector(model, [1], 0, scale=4.0)
        ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(6))
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        with torch.no_grad(), steer(model, vector, positions="prompt"):
            by_name = model(input_ids=ids, attention_mask=mask).logits
            by_position = call(model, ids, mask).logits
        assert torch.equal(by_position, by_name), arch


def test_rank_above_the_kernel_limit_is_rejected_by_the_bank(tiny_model_factory):
    model = tiny_model_factory("llama")

    def lowrank(rank):
        gen = torch.Generator().manual_seed(rank)
        return SteeringVector.from_lowrank(
            {2: (None, torch.randn(64, rank, generator=gen) / 64, torch.randn(64, rank, generator=gen) / 64)})

    before = steerkern_hook_count(model)
    with pytest.raises(ValueError, match=r"vectors\[1\].*layer 2.*R = 65.*R <= 64"):
        with steer(model, [lowrank(64), lowrank(65)], slots=[0, 1]):
            pass
    assert steerkern_hook_count(model) == before
    with torch.no_grad(), steer(model, lowrank(64)):
        assert torch.isfinite(model(torch.randint(3, 100, (1, 4))).logits).all()


def test_coeff_and_slots_as_numpy_and_single_values(tiny_model_factory):
    np = pytest.importorskip("numpy")
    model = tiny_model_factory("llama")
    vectors = [random_vector(model, [1], 0), random_vector(model, [1], 1)]
    ids = torch.randint(3, 100, (2, 5))
    with torch.no_grad():
        with steer(model, vectors, slots=[1, 1], coeff=[2.0, -1.0]):
            expected = model(ids).logits
        for slots, coeff in ((np.array([1, 1]), np.array([2.0, -1.0])),
                             (1, [2.0, -1.0]), (np.int64(1), torch.tensor([2.0, -1.0]))):
            with steer(model, vectors, slots=slots, coeff=coeff):
                torch.testing.assert_close(model(ids).logits, expected)
        with steer(model, vectors, slots=[1, 1], coeff=[2.0, 2.0]):
            expected = model(ids).logits
        for coeff in (np.float32(2.0), np.int64(2), np.array(2.0)):
            with steer(model, vectors, slots=1, coeff=coeff):
                torch.testing.assert_close(model(ids).logits, expected)
    for kwargs, message in ((dict(coeff=np.array([1.0, np.nan])), "NaN"),
                            (dict(coeff=[]), "coeff is empty"),
                            (dict(slots=np.array([0.5, 1.0])), "integers"),
                            (dict(slots=True), "slots must be"),
                            (dict(slots=["a", "b"]), "slots must hold integers"),
                            (dict(slots=[0, True]), "slots must hold integers"),
                            (dict(normalize="false"), "normalize must be True or False"),
                            (dict(slots=2), "slots must be in")):
        with pytest.raises((ValueError, TypeError), match=message):
            with steer(model, vectors, **kwargs):
                pass
    assert steerkern_hook_count(model) == 0


def test_position_mask_rows_must_match_the_batch(tiny_model_factory):
    model = tiny_model_factory("llama")
    mask = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="positions mask has 2"):
        with torch.no_grad(), steer(model, random_vector(model, [1], 0), positions=mask):
            model(torch.randint(3, 100, (3, 5)))
    assert steerkern_hook_count(model) == 0


def test_positions_when_a_conversation_continues_without_a_cache(tiny_model_factory):
    """``use_cache=False`` re-runs the whole sequence each step; a second generate in the same
    context whose prompt extends the first one (the conversation so far plus a new turn) is a
    new prompt, not decode steps of the first."""
    model = tiny_model_factory("llama")
    vector = random_vector(model, [1, 2], 0, scale=4.0)
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(7))
    run = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None, use_cache=False,
               output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        with steer(model, vector, coeff=1.0, positions="generated"):
            first = model.generate(ids, **run)
            turn = torch.cat([first.sequences, torch.randint(3, 100, (2, 4))], dim=1)
            second = model.generate(turn, **run)
        plain = model.generate(turn, **run)
    assert torch.equal(second.scores[0], plain.scores[0])
    assert not torch.equal(second.scores[1], plain.scores[1])


def test_positions_inside_generate_follow_its_prompt_length(tiny_model_factory):
    """Inside ``generate`` the prompt is what it was given: a chunked prefill whose last chunk
    is one token (11 tokens in chunks of 5) is all prompt, and assisted decoding's draft tokens
    (prompt lookup) are generated, exactly as an explicit positions mask says."""
    from transformers import GenerationConfig

    model = tiny_model_factory("llama")
    vector = random_vector(model, [1, 2], 0, scale=4.0)
    ids = torch.randint(3, 100, (2, 11), generator=torch.Generator().manual_seed(7))
    if hasattr(GenerationConfig(), "prefill_chunk_size"):
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), prefill_chunk_size=5)
        plain = _first_scores(model, None, None, **kwargs)
        assert torch.equal(_first_scores(model, vector, "generated", **kwargs), plain)
        torch.testing.assert_close(_first_scores(model, vector, "prompt", **kwargs),
                                   _first_scores(model, vector, "all", **kwargs))
    # prompt lookup drafts from a repeated prompt; the main model checks them in one pass
    repeated = torch.cat([ids[:1, :5]] * 3, dim=1)
    run = dict(input_ids=repeated, attention_mask=torch.ones_like(repeated), max_new_tokens=8,
               min_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=2,
               prompt_lookup_num_tokens=3)  # an EOS id: transformers 4.50's prompt lookup needs one
    width = repeated.shape[1]
    for positions in ("generated", "prompt"):
        mask = torch.zeros(1, width + 8, dtype=torch.bool)
        if positions == "generated":
            mask[:, width:] = True
        else:
            mask[:, :width] = True
        with torch.no_grad():
            with steer(model, vector, positions=positions):
                by_name = model.generate(**run)
            with steer(model, vector, positions=mask):
                by_mask = model.generate(**run)
        assert torch.equal(by_name, by_mask), positions


def test_generate_is_restored_whatever_order_banks_detach_in(tiny_model_factory):
    from steerkern.control import SteeringBank

    model = tiny_model_factory("gpt2")
    assert "generate" not in model.__dict__
    vector = random_vector(model, [1], 0)
    outer = SteeringBank(model, [vector], positions="generated")
    inner = SteeringBank(model, [vector], positions="prompt")
    outer.attach()
    inner.attach()
    outer.detach()  # out of order
    assert "generate" in model.__dict__  # inner still attached
    inner.detach()
    assert "generate" not in model.__dict__ and steerkern_hook_count(model) == 0
    with steer(model, vector, positions="generated"):
        raise_inside = pytest.raises(RuntimeError, match="boom")
        with raise_inside:
            with steer(model, vector, positions="prompt"):
                raise RuntimeError("boom")
        assert "generate" in model.__dict__
    assert "generate" not in model.__dict__ and steerkern_hook_count(model) == 0


def test_per_row_values_repeat_only_for_generate_expansions(tiny_model_factory):
    """Outside generate a batch whose rows do not match the per-row slots / coefficients / mask
    rows is an error (SPEC 9), even when their count divides it; generate's
    num_return_sequences copies of a row share its values."""
    model = tiny_model_factory("llama")
    ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    v0, v1 = random_vector(model, [1], 0, 3.0), random_vector(model, [1], 1, 3.0)
    cases = [(dict(vectors=[v0, v1], slots=[0, 1], coeff=[1.0, 2.0]), torch.cat([ids, ids]), "given for 2"),
             (dict(vectors=v0, coeff=[5.0]), ids, "given for 1"),
             (dict(vectors=v0, positions=torch.ones(1, 5, dtype=torch.bool)), ids, "positions mask has 1")]
    for kwargs, batch, message in cases:
        with pytest.raises(ValueError, match=f"the batch has {batch.shape[0]} rows but .*{message}"):
            with torch.no_grad(), steer(model, kwargs.pop("vectors"), **kwargs):
                model(batch)
        assert steerkern_hook_count(model) == 0
    settings = dict(max_new_tokens=3, do_sample=True, top_k=1, pad_token_id=0)  # sampling, greedy in effect
    with torch.no_grad():
        with steer(model, [v0, v1], slots=[0, 1], coeff=[2.0, -2.0]):
            expanded = model.generate(ids, num_return_sequences=2, **settings)
        for row, (vector, c) in enumerate([(v0, 2.0), (v1, -2.0)]):
            with steer(model, vector, coeff=c):
                alone = model.generate(ids[row:row + 1], **settings)
            assert torch.equal(expanded[2 * row], alone[0]) and torch.equal(expanded[2 * row + 1], alone[0])


def test_sub_modules_called_outside_a_pass_are_refused_but_checkpointing_recomputes(tiny_model_factory):
    """A sub-module called by itself once the model's pass is over would steer with that
    pass's per-token state (its padding, its rows): refused. Gradient checkpointing re-runs the
    layers during the backward pass: steered as in the forward pass, same gradients."""
    model = tiny_model_factory("llama")
    ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    vector = random_vector(model, [1], 0, 3.0)
    with torch.no_grad(), steer(model, vector, coeff=2.0):
        model(ids, attention_mask=mask)
        with pytest.raises(RuntimeError, match="outside a forward pass of the steered model"):
            model.model(ids)
    assert steerkern_hook_count(model) == 0

    def gradients(checkpointing: bool):
        model.zero_grad()
        prefix = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"  # 5.x name
        if checkpointing:
            getattr(model, f"{prefix}_checkpointing_enable")(
                **{f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}})
        model.train()
        try:
            with steer(model, [vector], slots=[0, -1], coeff=[2.0, 0.0]):
                model(ids, attention_mask=mask).logits.square().mean().backward()
        finally:
            model.eval()
            if checkpointing:
                getattr(model, f"{prefix}_checkpointing_disable")()
        return [p.grad.clone() for p in model.parameters()]

    try:
        plain, recomputed = gradients(False), gradients(True)
    finally:
        model.zero_grad(set_to_none=True)  # the factory's models are shared by other tests
    for a, b in zip(plain, recomputed):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("positions", ["generated", "prompt", "mask"])
def test_positional_steering_compiles_once_over_a_static_cache(tiny_model_factory, positions):
    """Decode steps compiled with torch.compile over a static cache: the cache length stays a
    tensor (no host sync, no value baked into the graph), so no step recompiles, and the
    steps steer as in eager mode."""
    import torch._dynamo as dynamo
    from torch._dynamo.testing import CompileCounter
    from transformers import StaticCache

    from steerkern.kvcache import cache_argument

    model = tiny_model_factory("llama")
    ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    vector = random_vector(model, [1], 0, 3.0)
    where = torch.rand(2, 12, generator=torch.Generator().manual_seed(1)) < 0.5 if positions == "mask" else positions

    cache_arg = cache_argument(model)

    def static_cache():
        try:  # transformers 4.5x sizes the batch up front
            return StaticCache(config=model.config, max_cache_len=16, max_batch_size=ids.shape[0])
        except TypeError:
            return StaticCache(config=model.config, max_cache_len=16)

    def decode(step):
        cache = static_cache()
        out = []
        with torch.no_grad(), steer(model, vector, coeff=2.0, positions=where):
            logits = model(ids, **{cache_arg: cache}, cache_position=torch.arange(5)).logits
            token = logits[:, -1:].argmax(-1)
            for i in range(5):
                logits = step(token, cache, torch.tensor([5 + i]))
                out.append(logits)
                token = logits[:, -1:].argmax(-1)
        return torch.cat(out, 1)

    eager = lambda token, cache, position: model(token, **{cache_arg: cache}, cache_position=position).logits  # noqa: E731
    dynamo.reset()
    counter = CompileCounter()
    compiled = decode(torch.compile(eager, backend=counter, dynamic=False))
    frames = counter.frame_count
    dynamo.reset()
    assert frames <= 2, f"{frames} frames compiled for 5 decode steps: a step recompiled"
    torch.testing.assert_close(compiled, decode(eager))


def test_a_vector_that_overflows_the_models_dtype_is_refused():
    """A finite float32 vector with entries past float16's range became Inf in a float16
    model's bank and steered every token to NaN, whatever the coefficient."""
    from tests.tiny_models import build_tiny_model

    model = build_tiny_model("llama").half()
    for vector in (SteeringVector.from_directions({1: torch.full((64,), 1e6)}),
                   SteeringVector.from_lowrank({1: (None, torch.full((64, 1), 1e6), torch.ones(64, 1))})):
        with pytest.raises(ValueError, match=r"vectors\[0\] at layer 1, target 'residual' \(a torch.float16 module\): (bias|A) does not fit"):
            with steer(model, vector, coeff=1e-6):
                pass
        assert steerkern_hook_count(model) == 0
    with steer(model, SteeringVector.from_directions({1: torch.full((64,), 6e4)})):
        pass  # within float16's range


def test_generate_expands_rows_only_of_a_batch_given_with_as_many_rows(tiny_model_factory):
    """Values for 3 rows with 6 prompts given to generate were repeated (row i -> rows 2i, 2i+1)
    as if generate had made the copies: prompt 1 was steered with row 0's vector."""
    model = tiny_model_factory("llama")
    vectors = [SteeringVector.from_directions({1: torch.ones(64)}), SteeringVector.from_directions({2: -torch.ones(64)})]
    ids = torch.randint(3, 100, (6, 4), generator=torch.Generator().manual_seed(0))
    with steer(model, vectors, slots=[0, 1, -1], coeff=[4.0, -3.0, 0.0]):
        with pytest.raises(ValueError, match="the batch has 6 rows but slots/coeff were given for 3"):
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
        out = model.generate(input_ids=ids[:3], attention_mask=torch.ones_like(ids[:3]), max_new_tokens=2,
                             do_sample=False, num_beams=2, num_return_sequences=2)  # generate's own copies
    assert out.shape[0] == 6 and steerkern_hook_count(model) == 0


def test_a_deep_copy_inside_steer_is_refused_and_outside_is_clean(tiny_model_factory):
    """A copy made inside the block carried the hooks, which kept acting for the original (the
    copy then failed after the block with 'ran outside a forward pass'), and a generate wrapper
    that ran the original model."""
    import copy

    model = tiny_model_factory("llama")
    vector = SteeringVector.from_directions({1: torch.ones(64)})
    with steer(model, vector, coeff=2.0):
        with pytest.raises(RuntimeError, match="copy.deepcopy of LlamaForCausalLM inside steer"):
            copy.deepcopy(model)
    clone = copy.deepcopy(model)
    assert steerkern_hook_count(clone) == 0 and "generate" not in clone.__dict__
    assert not any(name.startswith("_steerkern") or name == "__deepcopy__" for name in model.__dict__)
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(clone(ids).logits, model(ids).logits)


def test_tensors_without_data_and_non_real_coefficients_are_refused_by_name(tiny_model_factory):
    """A tensor on the meta device (a shape, no values), a bool or complex coefficient tensor
    (which a cast to float32 turned into 1.0 or dropped the imaginary part of, silently), a
    one-element list holding a whole tensor, a model that is not a module and ``vectors=None``
    fail with the argument's name, and leave no hook behind."""
    model = tiny_model_factory("llama")
    vector = random_vector(model, [1], 0)
    meta = dict(device="meta")
    cases = [
        (lambda: SteeringVector.from_directions({1: torch.empty(64, **meta)}), ValueError, "bias .*meta"),
        (lambda: vector * torch.tensor(2.0, **meta), ValueError, "factor .*meta"),
        (lambda: vector.to("meta"), ValueError, "device='meta'"),
        (lambda: vector.to("nodevice"), ValueError, "device='nodevice' is not a device"),
        (lambda: vector.to(dtype=torch.int32), TypeError, "dtype must be a floating-point"),
        (lambda: vector.validate("a model"), TypeError, "model must be a causal LM"),
    ]
    for thunk, error, message in cases:
        with pytest.raises(error, match=message):
            thunk()
    for kwargs, error, message in (
        (dict(coeff=torch.tensor(1.0, **meta)), ValueError, "coeff .*meta"),
        (dict(coeff=[torch.tensor(1.0, **meta)]), ValueError, "coeff .*meta"),
        (dict(coeff=torch.tensor([True, False])), TypeError, "coeff must hold real numbers"),
        (dict(coeff=torch.tensor([1 + 2j])), TypeError, "coeff must hold real numbers"),
        (dict(coeff=[torch.tensor([1.0, 2.0])]), TypeError, "coeff values must be numbers"),
        (dict(slots=torch.tensor([0], **meta)), ValueError, "slots .*meta"),
        (dict(slots=[torch.tensor([0, 0])]), TypeError, "slots must hold integers"),
        (dict(positions=torch.ones(1, 3, dtype=torch.bool, **meta)), ValueError, "positions mask .*meta"),
        (dict(vectors=None), TypeError, "vectors must be a SteeringVector or a list"),
        (dict(model="a model"), TypeError, "model must be a causal LM"),
    ):
        args = dict(model=model, vectors=vector)
        args.update(kwargs)
        with pytest.raises(error, match=message):
            with steer(args.pop("model"), args.pop("vectors"), **args):
                pass
    assert steerkern_hook_count(model) == 0
    with torch.no_grad():  # 0-d and one-element tensors in a list are numbers
        ids = torch.randint(3, 100, (2, 5))
        with steer(model, vector, slots=[0, 0], coeff=[2.0, -1.0]):
            expected = model(ids).logits
        with steer(model, vector, slots=[torch.tensor(0), torch.tensor([0])],
                   coeff=[torch.tensor(2.0), torch.tensor([-1.0])]):
            torch.testing.assert_close(model(ids).logits, expected)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_positions_from_a_token_index_count_each_rows_real_tokens(arch, tiny_model_factory):
    """``positions=k`` (steering-vectors' ``min_token_index``): under left padding and the KV
    cache of ``generate``, each row is steered from its k-th real token on, generated tokens
    included, as a hand-written hook that re-runs the whole sequence without a cache steers it."""
    model = tiny_model_factory(arch)
    vector = random_vector(model, [1], seed=3, scale=4.0)
    bias = vector.parts[(1, "residual")].bias
    ids = torch.tensor([[0, 0, 0, 5, 6, 7], [4, 5, 6, 7, 8, 9]])
    mask = (ids != 0).long()
    k, new = 2, 4

    def hook(module, args, output):
        hidden = (output[0] if isinstance(output, tuple) else output).clone()
        real = state["mask"].cumsum(1) - 1
        hidden += 1.5 * bias * ((real >= k) & state["mask"].bool())[..., None]
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    state = {"mask": mask}
    want_ids = ids
    handle = decoder_layers(model)[1].register_forward_hook(hook)
    try:
        with torch.no_grad():
            for _ in range(new):
                positions = (state["mask"].cumsum(1) - 1).clamp(min=0)
                logits = model(input_ids=want_ids, attention_mask=state["mask"], position_ids=positions,
                               use_cache=False).logits[:, -1]
                want_ids = torch.cat([want_ids, logits.argmax(-1, keepdim=True)], 1)
                state["mask"] = torch.cat([state["mask"], torch.ones(2, 1, dtype=torch.long)], 1)
    finally:
        handle.remove()
    with torch.no_grad(), steer(model, vector, coeff=1.5, positions=k):
        got = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=0)
    assert torch.equal(got, want_ids)
    with torch.no_grad():  # k = 0 is every real token, as positions="all"
        with steer(model, vector, coeff=1.5, positions=0):
            from_zero = model(ids, attention_mask=mask).logits
        with steer(model, vector, coeff=1.5):
            everything = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(from_zero, everything)
    assert steerkern_hook_count(model) == 0


def test_a_token_index_position_is_checked(tiny_model_factory):
    model = tiny_model_factory("llama")
    vector = random_vector(model, [1], seed=0)
    with pytest.raises(ValueError, match="positions=-1: a token index must be >= 0"):
        steer(model, vector, positions=-1).__enter__()
    with pytest.raises(TypeError, match="positions must be a string, an int token index or a bool tensor"):
        steer(model, vector, positions=True).__enter__()
    with pytest.raises(TypeError, match="positions must be"):
        steer(model, vector, positions=1.5).__enter__()
    assert steerkern_hook_count(model) == 0
