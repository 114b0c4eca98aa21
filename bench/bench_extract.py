"""Extraction cost: ``uv run pytest bench/bench_extract.py --benchmark-only``.

On the default model (SmolLM2-135M-Instruct), the same contrast pairs (sentiment personas over
the shipped suffixes) and the same middle band of layers (``default_layers``), two ways to get
the last-token activations that every method starts from:

- ``shared``: ``steerkern.capture.capture`` as ``extract`` runs it — forward hooks on the
  requested layers only, the last non-pad position of each text kept, the forward pass stopped
  after the deepest layer, and every token prefix shared by several texts computed once
  (:mod:`steerkern.prefix_tree`);
- ``hooked``: the same without prefix sharing (``share_prefixes=False``): whole texts in
  length-sorted batches;
- ``plain``: what repeng-style code does — ``model(..., output_hidden_states=True)`` over all
  layers (and the LM head), then ``hidden_states[layer + 1][:, -1]`` for each layer, in the
  same length-sorted batches as ``hooked``.

All three give the same activations (checked, rtol 1e-4). Two data sets: the sentiment persona
pairs (persona turn x suffixes cut at two lengths) and, when ``../shared/data`` is present,
model-written-evals A/B items (question + " (A" against question + " (B"). ``extra_info``
records the median wall and process-CPU seconds of each variant from the same run (one torch
thread on CPU), the ratios against ``plain``, and the peak memory above the loaded model of each:
on CUDA ``max_memory_allocated``; on CPU the peak resident set (``VmHWM`` after resetting it via
``/proc/self/clear_refs``) of a fresh subprocess per variant.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from steerkern.capture import _length_batches, _pad, _tokenize, capture
from steerkern.data import concept_pairs, load_mwe, mwe_pairs
from steerkern.models import default_layers, load_model

CUDA = torch.cuda.is_available()
BATCH = 16


MWE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mwe_xrisk"


def setup(data="persona"):
    model, tokenizer = load_model(device_map="cuda" if CUDA else None)
    if data == "persona":
        pairs = concept_pairs("sentiment", tokenizer, max_suffixes=4, cuts=2)
    else:
        pairs = mwe_pairs(load_mwe(sorted(MWE.glob("*.jsonl"))[0], limit=32), tokenizer)
    texts = [t for pair in pairs for t in pair]
    return model, tokenizer, texts, default_layers(model)


def plain(model, tokenizer, texts, layers):
    """All hidden states per batch, then the last token of each requested layer."""
    ids = _tokenize(model, tokenizer, texts)
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


def hooked(model, tokenizer, texts, layers, share_prefixes=False):
    got = capture(model, tokenizer, texts, layers, batch_size=BATCH, progress=False,
                  share_prefixes=share_prefixes)
    return {layer: t[:, 0] for layer, t in got.items()}


def shared(model, tokenizer, texts, layers):
    return hooked(model, tokenizer, texts, layers, share_prefixes=True)


VARIANTS = {"plain": plain, "hooked": hooked, "shared": shared}


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


def _cpu_peak_rss_mb(variant: str, data: str) -> float:
    """Peak RSS growth (MB) of one extraction in a fresh process, above the loaded model."""
    code = f"""
import json, torch
from bench.bench_extract import setup, VARIANTS
model, tokenizer, texts, layers = setup({data!r})
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
@pytest.mark.parametrize("data", ["persona", "mwe"])
def test_extract_capture_vs_output_hidden_states(benchmark, data):
    if data == "mwe" and not MWE.is_dir():
        pytest.skip("../shared/data is absent")
    model, tokenizer, texts, layers = setup(data)
    results = {name: fn(model, tokenizer, texts, layers) for name, fn in VARIANTS.items()}
    for name in ("hooked", "shared"):
        for layer in layers:
            torch.testing.assert_close(results[name][layer], results["plain"][layer], rtol=1e-4, atol=1e-4)

    reps = 5 if CUDA else 3
    threads = torch.get_num_threads()
    if not CUDA:
        torch.set_num_threads(1)  # one thread: steadier timings on a shared CPU
    try:
        times = {name: _median_seconds(lambda fn=fn: fn(model, tokenizer, texts, layers), reps)
                 for name, fn in VARIANTS.items()}
    finally:
        torch.set_num_threads(threads)
    if CUDA:
        peaks = {name: _cuda_peak_mb(lambda fn=fn: fn(model, tokenizer, texts, layers))
                 for name, fn in VARIANTS.items()}
    else:
        peaks = {name: _cpu_peak_rss_mb(name, data) for name in VARIANTS}
    info = dict(data=data, texts=len(texts), layers=f"{layers[0]}..{layers[-1]}", batch_size=BATCH,
                device=torch.cuda.get_device_name() if CUDA else "cpu")
    for name in VARIANTS:
        wall, cpu = times[name]
        info.update({f"{name}_s": wall, f"{name}_cpu_s": cpu, f"{name}_peak_mb": peaks[name]})
        if name != "plain":
            info[f"{name}_speedup"] = times["plain"][0] / wall
            info[f"{name}_cpu_speedup"] = times["plain"][1] / cpu
    benchmark.extra_info.update(info)
    print(json.dumps(info, indent=1))
    benchmark.pedantic(shared, args=(model, tokenizer, texts, layers), rounds=reps if CUDA else 1,
                       iterations=1)
