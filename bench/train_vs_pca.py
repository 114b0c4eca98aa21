"""Trained adapter against extracted pca_diff at equal ΔNLL (issue 7's comparison), on the
default model, CPU. Not a pytest file: a run takes 10-20 minutes.

    uv run python bench/train_vs_pca.py --steps 30 --seed 0 [--set key=value ...] [--out DIR]

Trains ``train_adapter`` on the shipped sentiment pairs (layers 10 and 12, rank 4), extracts
``pca_diff`` from the same pairs and layers, evaluates both with ``steerkern.evaluate`` (24
shipped eval prompts; ΔNLL from 12 generation prompts x 24 greedy tokens) over a coefficient grid
for each, then, per direction and ΔNLL budget, picks each vector's coefficient with the largest
mean shift (score(c) - score(0), per prompt) whose mean ΔNLL is within the budget, and prints the
difference trained - pca_diff with its standard error paired by prompt. ``--set`` passes extra
``train_adapter`` keywords (``--set projection=linear --set scale=pair --set shift_weight=0`` is
the exact SPEC loss).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from steerkern import evaluate, extract, load_model
from steerkern.data import concept_pairs
from steerkern.eval import DEFAULT_GEN_PROMPTS
from steerkern.train import train_adapter

LAYERS = [10, 12]
GEN_PROMPTS = list(DEFAULT_GEN_PROMPTS) + [
    "Describe the place where you grew up.", "What did you do yesterday?", "Tell me about your job.",
    "Write a few sentences about the weather today.", "What are your plans for the holidays?",
    "Describe a book you read recently.", "Tell me about a friend of yours.", "How was your morning?",
]
BUDGETS = (0.1, 0.2, 0.3, 0.4)


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def best_within(report, sign: int, budget: float):
    """(coeff, per-prompt shifts [P], ΔNLL) of the largest mean shift toward ``sign`` whose
    mean ΔNLL is at most ``budget``; None when no coefficient qualifies."""
    coeffs = list(report.coeffs)
    scores = torch.tensor(report.prompt_scores, dtype=torch.float64)  # [P, C]
    zero = coeffs.index(0)
    best = None
    for j, c in enumerate(coeffs):
        if c * sign <= 0 or report.delta_nll[j] > budget:
            continue
        shift = scores[:, j] - scores[:, zero]
        if best is None or sign * shift.mean() > sign * best[1].mean():
            best = (c, shift, report.delta_nll[j])
    return best


def _mean_se(x: torch.Tensor) -> str:
    return f"{x.mean():+.2f} ± {x.std() / math.sqrt(x.numel()):.2f}"


def comparison_table(trained, baseline) -> str:
    lines = ["| direction | ΔNLL budget | trained: coeff, shift (ΔNLL) | pca_diff: coeff, shift (ΔNLL) "
             "| trained - pca_diff (paired) |", "|---|---:|---|---|---|"]
    for sign, name in ((1, "toward chosen"), (-1, "toward rejected")):
        for budget in BUDGETS:
            a, b = best_within(trained, sign, budget), best_within(baseline, sign, budget)
            cell = lambda x: "-" if x is None else f"{x[0]:+g}: {_mean_se(x[1])} ({x[2]:+.2f})"
            diff = "-" if a is None or b is None else _mean_se(a[1] - b[1])
            lines.append(f"| {name} | {budget} | {cell(a)} | {cell(b)} | {diff} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra train_adapter keyword (repeatable)")
    parser.add_argument("--trained-coeffs", type=float, nargs="+",
                        default=[-1, -0.5, -0.35, -0.25, -0.15, 0, 0.15, 0.25, 0.35, 0.5, 1])
    parser.add_argument("--pca-coeffs", type=float, nargs="+",
                        default=[-256, -192, -128, -64, -32, 0, 32, 64, 128, 192, 256])
    parser.add_argument("--max-suffixes", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write vectors and report JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    extra = dict(item.split("=", 1) for item in args.set)
    extra = {key: _value(value) for key, value in extra.items()}

    model, tokenizer = load_model()
    model.eval()
    pairs = concept_pairs("sentiment", tokenizer, max_suffixes=args.max_suffixes)
    start = time.time()
    trained = train_adapter(model, tokenizer, pairs, layers=LAYERS, steps=args.steps,
                            batch_size=4, lr=3e-3, rank=4, n_last=4, seed=args.seed,
                            progress=False, **extra)
    train_s = time.time() - start
    start = time.time()
    pca = extract(model, tokenizer, pairs, layers=LAYERS, method="pca_diff", progress=False)
    extract_s = time.time() - start
    reports = {}
    for name, vector, coeffs in (("trained", trained, args.trained_coeffs),
                                 ("pca_diff", pca, args.pca_coeffs)):
        coeffs = [int(c) if float(c).is_integer() else c for c in coeffs]
        reports[name] = evaluate(model, tokenizer, vector, coeffs=coeffs, max_new_tokens=24,
                                 gen_prompts=GEN_PROMPTS, name=name)
        print(reports[name], flush=True)
    print(f"\ntrain {train_s:.0f} s ({args.steps} steps, {len(pairs)} pairs, {extra or 'defaults'}), "
          f"pca_diff extraction {extract_s:.0f} s; loss history "
          f"{[round(x, 2) for x in trained.metadata['loss_history']]}\n")
    print(comparison_table(reports["trained"], reports["pca_diff"]))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        trained.save(args.out / "trained.safetensors")
        pca.save(args.out / "pca_diff.safetensors")
        for name, report in reports.items():
            report.save(args.out / name)
        (args.out / "settings.json").write_text(json.dumps(
            {"steps": args.steps, "seed": args.seed, "extra": extra, "train_s": train_s,
             "extract_s": extract_s}, indent=1))


if __name__ == "__main__":
    main()
