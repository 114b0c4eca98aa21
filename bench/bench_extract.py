"""Extraction cost: ``uv run pytest bench/bench_extract.py --benchmark-only``.

On the default model (SmolLM2-135M-Instruct), the same contrast pairs (sentiment personas over
the shipped suffixes) and the same middle band of layers (``default_layers``), two ways to get
the last-token activations that every method starts from:

- ``hooked``: ``steerkern.capture.capture`` — forward hooks on the requested layers only, the
  last non-pad position of each row kept, the forward pass stopped after the deepest layer;
- ``plain``: what repeng-style code does — ``model(..., output_hidden_states=True)`` over all
  layers (and the LM head), then ``hidden_states[layer + 1][:, -1]`` for each layer.

Both use the same length-sorted batches of the same size and produce identical activations
(checked). ``extra_info`` records the median wall and process-CPU seconds of both from the same
run (one torch thread on CPU), their ratios,
and the peak memory above the loaded model of each: on CUDA ``max_memory_allocated``; on CPU
the peak resident set (``VmHWM`` after resetting it via ``/proc/self/clear_refs``) of a fresh
subprocess per variant.
"""

import json
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch

from steerkern.capture import _length_batches, _pad, _tokenize, capture
from steerkern.data import concept_pairs
from steerkern.models import default_layers, load_model

CUDA = torch.cuda.is_available()
BATCH = 16


def setup(max_suffixes=4):
    model, tokenizer = load_model(device_map="cuda" if CUDA else None)
    pairs = concept_pairs("sentiment", tokenizer, max_suffixes=max_suffixes, cuts=2)
    texts = [t for pair in pairs for t in pair]
    return model, tokenizer, texts, default_layers(model)


def plain(model, tokenizer, texts, layers):
    """All hidden states per batch, then the last token of each requested layer."""
    ids = _tokenize(tokenizer, texts)
    result = {layer: [None] * len(texts) for layer in layers}
    device = model.get_input_embeddings().weight.device
    with torch.inference_mode():
        for batch in _length_batches([len(s) for s in ids], BATCH):
            input_ids, mask, positions = _pad([ids[i] for i in batch], tokenizer.pad_token_id, "left")
            out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                        position_ids=positions.to(device), output_hidden_states=True, use_cache=False)
            for layer in layers:
                picked = out.hidden_states[layer + 1][:, -1].float().cpu()
                for row, index in enumerate(batch):
                    result[layer][index] = picked[row]
    return {layer: torch.stack(rows) for layer, rows in result.items()}


def hooked(model, tokenizer, texts, layers):
    got = capture(model, tokenizer, texts, layers, batch_size=BATCH, progress=False)
    return {layer: t[:, 0] for layer, t in got.items()}


VARIANTS = {"plain": plain, "hooked": hooked}


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _median_seconds(fn, reps):
    """Median wall seconds and median CPU seconds of this process (the CPU time is the steadier
    number on a shared machine)."""
    wall, cpu = [], []
    for _ in range(reps):
        _sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        _sync()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def _cpu_peak_rss_mb(variant: str) -> float:
    """Peak RSS growth (MB) of one extraction in a fresh process, above the loaded model."""
    code = f"""
import json, torch
from bench.bench_extract import setup, VARIANTS
model, tokenizer, texts, layers = setup()
VARIANTS[{variant!r}](model, tokenizer, texts[:8], layers)  # warm up allocator and kernels
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
base = status('VmRSS')
open('/proc/self/clear_refs', 'w').write('5')
VARIANTS[{variant!r}](model, tokenizer, texts, layers)
print(json.dumps(status('VmHWM') - base))
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return float(json.loads(done.stdout.strip().splitlines()[-1]))


def _cuda_peak_mb(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


@pytest.mark.benchmark(group="extract")
def test_extract_capture_vs_output_hidden_states(benchmark):
    model, tokenizer, texts, layers = setup()
    fast = hooked(model, tokenizer, texts, layers)
    slow = plain(model, tokenizer, texts, layers)
    for layer in layers:
        torch.testing.assert_close(fast[layer], slow[layer], rtol=1e-4, atol=1e-4)

    reps = 5 if CUDA else 3
    threads = torch.get_num_threads()
    if not CUDA:
        torch.set_num_threads(1)  # one thread: steadier timings on a shared CPU
    try:
        t_plain, cpu_plain = _median_seconds(lambda: plain(model, tokenizer, texts, layers), reps)
        t_hooked, cpu_hooked = _median_seconds(lambda: hooked(model, tokenizer, texts, layers), reps)
    finally:
        torch.set_num_threads(threads)
    if CUDA:
        mem_plain = _cuda_peak_mb(lambda: plain(model, tokenizer, texts, layers))
        mem_hooked = _cuda_peak_mb(lambda: hooked(model, tokenizer, texts, layers))
    else:
        mem_plain, mem_hooked = _cpu_peak_rss_mb("plain"), _cpu_peak_rss_mb("hooked")
    benchmark.extra_info.update(
        texts=len(texts), layers=f"{layers[0]}..{layers[-1]}", batch_size=BATCH,
        plain_s=t_plain, hooked_s=t_hooked, speedup=t_plain / t_hooked,
        plain_cpu_s=cpu_plain, hooked_cpu_s=cpu_hooked, cpu_speedup=cpu_plain / cpu_hooked,
        plain_peak_mb=mem_plain, hooked_peak_mb=mem_hooked,
        device=torch.cuda.get_device_name() if CUDA else "cpu",
    )
    print(json.dumps(benchmark.extra_info, indent=1))
    benchmark.pedantic(hooked, args=(model, tokenizer, texts, layers), rounds=reps if CUDA else 1,
                       iterations=1)
