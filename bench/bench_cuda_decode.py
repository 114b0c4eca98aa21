"""Steered decoding on CUDA (issue 3's CUDA targets): ``uv run pytest bench/bench_cuda_decode.py
--benchmark-only -s`` (skipped without a GPU).

Random-initialised bf16 models with real shapes (no download; the steering cost depends on
shapes only): ``smollm2-135m`` (the default model's config) and ``llama3-8b`` (hidden 4096,
32 layers, vocabulary 128256). Steering: one additive vector on the default middle band of
layers (``steerkern.models.default_layers``), every row steered.

- ``decode_step``: one greedy decode step of a batch over a StaticCache, eager and as a
  captured CUDA graph, steered against unsteered, alternating rounds (A B A B ...) of 32 steps
  timed with CUDA events; ``extra_info["overhead"]`` is the median of the per-pair ratios
  minus 1. Target: 5% or less, with and without CUDA graphs.
- ``per_request``: 8 requests, each with its own vector, in one steered ``generate`` against 8
  batch-1 generates (one vector at a time). Target: 5x or more.
"""

import statistics

import pytest
import torch

from steerkern import SteeringVector
from steerkern.control import SteeringBank
from steerkern.models import default_layers

pytestmark = pytest.mark.gpu

SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         rope_theta=100000.0, tie_word_embeddings=True),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      rope_theta=500000.0, tie_word_embeddings=False),
}
PROMPT_LEN = 64
STEPS_PER_ROUND = 32
ROUNDS = 15


@pytest.fixture(scope="module")
def models():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return {}


def random_model(cache, name):
    from transformers import LlamaConfig, LlamaForCausalLM

    if name not in cache:
        cache.clear()
        torch.cuda.empty_cache()
        config = LlamaConfig(**SHAPES[name], max_position_embeddings=4096, pad_token_id=0,
                             bos_token_id=1, eos_token_id=2)
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
        cache[name] = model
    return cache[name]


def middle_band_vector(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = model.config.hidden_size
    return SteeringVector.from_directions(
        {layer: torch.randn(width, generator=g) / width**0.5 for layer in default_layers(model)})


class StaticDecoder:
    """Greedy decoding over a StaticCache, one token per row per ``step()``; ``rewind()`` puts
    the cache back to the end of the prompt, so every round decodes over the same lengths."""

    def __init__(self, model, batch, steps):
        from transformers import StaticCache

        self.model = model
        self.cache = StaticCache(config=model.config, max_cache_len=PROMPT_LEN + steps + 8)
        ids = torch.randint(3, model.config.vocab_size, (batch, PROMPT_LEN), device="cuda")
        with torch.no_grad():
            logits = model(input_ids=ids, cache=self.cache, use_cache=True).logits
        self.token = logits[:, -1:].argmax(-1)
        self.first = self.token.clone()

    def step(self):
        logits = self.model(input_ids=self.token, cache=self.cache, use_cache=True,
                            logits_to_keep=1).logits[:, -1]
        self.token.copy_(logits.argmax(-1, keepdim=True))
        return logits

    def rewind(self):
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(PROMPT_LEN)
        self.token.copy_(self.first)


def capture(decoder):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):
            decoder.step()
    torch.cuda.current_stream().wait_stream(stream)
    decoder.rewind()
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        decoder.step()
    return graph


def time_round(run_step, decoder):
    decoder.rewind()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(STEPS_PER_ROUND):
        run_step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / STEPS_PER_ROUND


def paired(candidate, baseline, rounds=ROUNDS):
    candidate(), baseline()
    pairs = [(candidate(), baseline()) for _ in range(rounds)]
    c, b = zip(*pairs)
    return statistics.median(c), statistics.median(b), statistics.median(x / y for x, y in pairs)


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cudagraph"])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_decode_step_overhead(benchmark, models, shape, batch, graphs):
    model = random_model(models, shape)
    vector = middle_band_vector(model)
    total = STEPS_PER_ROUND
    plain = StaticDecoder(model, batch, total)
    steered = StaticDecoder(model, batch, total)
    bank = SteeringBank(model, vector)
    bank.set_batch(coeff=4.0)
    with torch.no_grad():
        if graphs:
            plain_graph = capture(plain)
            with bank.attached():
                steered_graph = capture(steered)

            def candidate():
                return time_round(steered_graph.replay, steered)

            run_plain = plain_graph.replay
        else:
            def candidate():
                with bank.attached():  # hooks registered outside the timed steps
                    return time_round(steered.step, steered)

            run_plain = plain.step

        def baseline():
            return time_round(run_plain, plain)

        steered_s, plain_s, ratio = paired(candidate, baseline)
        benchmark.pedantic(candidate, rounds=3, iterations=1)
    info = dict(device=torch.cuda.get_device_name(), shape=shape, batch=batch, graphs=graphs,
                steered_layers=len(vector.layers), steered_step_ms=steered_s * 1e3,
                plain_step_ms=plain_s * 1e3, overhead=ratio - 1, rounds=ROUNDS)
    benchmark.extra_info.update(info)
    print(f"\nDECODE {shape:13s} batch={batch} {'graph' if graphs else 'eager'}: plain "
          f"{plain_s * 1e3:.3f} ms, steered {steered_s * 1e3:.3f} ms, overhead {100 * (ratio - 1):+.2f}%")


@pytest.mark.parametrize("shape", list(SHAPES))
def test_per_request_batch_vs_one_vector_at_a_time(benchmark, models, shape):
    model = random_model(models, shape)
    vectors = [middle_band_vector(model, seed) for seed in range(8)]
    ids = torch.randint(3, model.config.vocab_size, (8, 32), device="cuda")
    new_tokens = 32

    def generate(batch_ids, bank):
        with torch.no_grad(), bank.attached():
            out = model.generate(input_ids=batch_ids, attention_mask=torch.ones_like(batch_ids),
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return out

    batch_bank = SteeringBank(model, vectors)
    batch_bank.set_batch(slots=list(range(8)), coeff=4.0)
    single_banks = [SteeringBank(model, v) for v in vectors]
    for bank in single_banks:
        bank.set_batch(coeff=4.0)

    def one_batch():
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        out = generate(ids, batch_bank)
        end.record()
        torch.cuda.synchronize()
        one_batch.out = out
        return start.elapsed_time(end) / 1e3

    def one_at_a_time():
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        outs = [generate(ids[i: i + 1], bank) for i, bank in enumerate(single_banks)]
        end.record()
        torch.cuda.synchronize()
        one_at_a_time.out = torch.cat(outs)
        return start.elapsed_time(end) / 1e3

    batched_s, single_s, ratio = paired(one_batch, one_at_a_time, rounds=3)
    agreement = (one_batch.out == one_at_a_time.out).float().mean().item()
    benchmark.pedantic(one_batch, rounds=2, iterations=1)
    benchmark.extra_info.update(dict(device=torch.cuda.get_device_name(), shape=shape,
                                     batched_s=batched_s, one_at_a_time_s=single_s,
                                     speedup=1 / ratio, token_agreement=agreement))
    print(f"\nPER-REQUEST {shape}: batch of 8 {batched_s:.3f} s, 8 x batch-1 {single_s:.3f} s, "
          f"speedup {1 / ratio:.2f}x, token agreement {agreement:.3f}")
    assert agreement > 0.9
