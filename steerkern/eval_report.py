"""Statistics, reports, tables and plots of steering evaluations (``steerkern.eval`` computes them).

Statistics (``scores[p, j]`` is prompt ``p``'s score at coefficient ``c_j``):

    slope_p = sum_j (c_j - mean(c)) (scores[p, j] - mean_j scores[p, :]) / sum_j (c_j - mean(c))^2
    effect  = mean_p slope_p           effect_se = std_p(slope_p, ddof=1) / sqrt(P)

The standard error is *paired by prompt*: each prompt is its own control, so the large
differences between prompts' baseline scores cancel. Pooling every (prompt, coefficient) point
into one regression gives the same slope on a complete grid but a standard error inflated by
those baseline differences (:func:`pooled_slope` is kept for comparison and tests).

:class:`EvalReport` holds one vector's sweep, :class:`ComparisonReport` several side by side;
both print as a markdown table and ``save(directory)`` writes ``table.md``, ``report.json`` and
``plot.png``.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from steerkern import checks

REPORT_FORMAT = 1


# --- statistics -----------------------------------------------------------------------------


def mean_se(values, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error of the mean (``std(ddof=1) / sqrt(n)``) along ``axis``; the
    standard error is NaN when fewer than two values are given."""
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[axis]
    mean = values.mean(axis=axis)
    if n < 2:
        return mean, np.full_like(mean, np.nan)
    return mean, values.std(axis=axis, ddof=1) / math.sqrt(n)


def _check_grid(coeffs, scores) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(coeffs, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if c.ndim != 1 or s.ndim != 2 or s.shape[1] != c.shape[0]:
        raise ValueError(
            f"scores must be [prompts, coefficients] = [P, {c.shape[0]}], got {tuple(s.shape)}"
        )
    if np.ptp(c) == 0:
        raise ValueError(f"coeffs={c.tolist()}: a slope needs at least two distinct coefficients")
    return c, s


def per_prompt_slopes(coeffs, scores) -> np.ndarray:
    """Least-squares slope of each prompt's score against the coefficient.

    Args:
        coeffs: ``[C]`` coefficients (at least two distinct values).
        scores: ``[P, C]`` score of prompt ``p`` at coefficient ``c_j``.

    Returns:
        ``[P]`` slopes ``sum_j (c_j - c̄)(s_pj - s̄_p) / sum_j (c_j - c̄)^2``.
    """
    c, s = _check_grid(coeffs, scores)
    centred = c - c.mean()
    spread = centred @ centred
    if not spread > 0:
        raise ValueError(f"coeffs={c.tolist()} are too close together for a slope (their squared "
                         "spread underflows): give coefficients that differ more")
    return (s - s.mean(axis=1, keepdims=True)) @ centred / spread


def paired_slope(coeffs, scores) -> tuple[float, float]:
    """``(effect, effect_se)``: the mean per-prompt slope and its standard error over prompts
    (paired by prompt). NaN standard error for a single prompt."""
    slopes = per_prompt_slopes(coeffs, scores)
    mean, se = mean_se(slopes)
    return float(mean), float(se)


def pooled_slope(coeffs, scores) -> tuple[float, float]:
    """``(slope, se)`` of one ordinary least-squares fit through every (coefficient, score)
    point, ignoring which prompt each came from. Not used for reports: the comparison point
    that shows why :func:`paired_slope` pairs by prompt."""
    c, s = _check_grid(coeffs, scores)
    x = np.tile(c, s.shape[0])
    y = s.reshape(-1)
    centred = x - x.mean()
    sxx = centred @ centred
    slope = centred @ (y - y.mean()) / sxx
    residual = y - y.mean() - slope * centred
    dof = max(y.size - 2, 1)
    return float(slope), float(math.sqrt(residual @ residual / dof / sxx))


# --- reports --------------------------------------------------------------------------------


def _clean(value):
    """JSON-safe copy: NaN/inf -> None, numpy scalars/arrays -> Python."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _float(value) -> float:
    """A number read from report.json (``None``: NaN, as JSON cannot hold it)."""
    if value is None:
        return float("nan")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def _not_a_list(value):
    raise TypeError(f"expected a list of texts, got {value!r:.80}")


def _check_read(report: EvalReport) -> EvalReport:
    """``report`` read from a dict, when its parts describe one sweep: ``C`` distinct
    coefficients and ``C`` values in every per-coefficient list and every prompt's scores,
    string prompts labelled +1 / -1, string generation prompts and samples. A damaged file
    would otherwise load and fail later (``IndexError`` in ``table()``) or plot wrong numbers.

    Raises:
        ValueError: naming the first field that does not fit.
    """
    n = len(report.coeffs)
    if len(set(report.coeffs)) != n:
        raise ValueError(f"'coeffs' repeats a coefficient: {report.coeffs}")
    for name in ("scores", "score_se", "delta_nll", "delta_nll_se", "nll"):
        if len(getattr(report, name)) != n:
            raise ValueError(f"'{name}' has {len(getattr(report, name))} values for {n} coefficients")
    for i, (prompt, label, scores) in enumerate(zip(report.prompts, report.labels, report.prompt_scores)):
        if not isinstance(prompt, str):
            raise ValueError(f"prompts[{i}]['prompt'] is not a text: {prompt!r}")
        if label not in (1, -1):
            raise ValueError(f"prompts[{i}]['label'] must be +1 or -1, got {label!r}")
        if len(scores) != n:
            raise ValueError(f"prompts[{i}]['scores'] has {len(scores)} values for {n} coefficients")
    texts = {"gen_prompts": report.gen_prompts}
    texts.update({f"samples at coeff {c}": t for c, t in report.samples.items()})
    for name, values in texts.items():
        if not all(isinstance(t, str) for t in values):
            raise ValueError(f"'{name}' must be a list of texts, got {values!r:.80}")
    for c, values in report.samples.items():
        if c not in report.coeffs or len(values) != len(report.gen_prompts):
            raise ValueError(f"samples at coeff {c} do not match the coefficients {report.coeffs} and "
                             f"{len(report.gen_prompts)} generation prompts")
    return report


def counted(n: int, noun: str) -> str:
    """``1 prompt``, ``3 prompts``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _fmt(value: float, se: float | None = None, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    text = f"{value:+.{digits}f}"
    if se is not None and math.isfinite(se):
        text += f" ± {se:.{digits}f}"
    return text


def _one_line(text: str, width: int = 10**9) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _cell(text: str, width: int = 10**9) -> str:
    """``text`` as one markdown table cell: one line, ``|`` escaped."""
    return _one_line(text, width).replace("|", "\\|")


def coeff_text(c: float, sign: bool = False) -> str:
    """A coefficient as short as it reads back exactly: ``{:g}`` (``2``, ``0.5``, ``1e-05``),
    or Python's shortest round-trip ``repr`` where six digits would merge two coefficients."""
    short = f"{c:+g}" if sign else f"{c:g}"
    if float(short) == c:
        return short
    return f"{'+' if sign and c >= 0 else ''}{c!r}"


def _literal(text: str) -> str:
    """``text`` for a matplotlib label or title, shown as written (``$`` would start maths)."""
    return str(text).replace("$", r"\$")


@dataclass
class EvalReport:
    """The result of :func:`steerkern.evaluate`: one vector swept over coefficients.

    Attributes:
        coeffs: ``[C]`` the coefficients, in the order given.
        effect, effect_se: mean per-prompt slope of the score against the coefficient, and its
            standard error over prompts (paired by prompt). The score of a prompt is
            ``label * (log p(yes-variants) - log p(no-variants))`` at the answer position (for
            model-written-evals items: ``log p(matching) - log p(not matching)``), in nats.
        scores, score_se: ``[C]`` mean score over prompts at each coefficient and its SE.
        delta_nll, delta_nll_se: ``[C]`` coherence cost: per-token NLL of the generations at
            each coefficient under the *unsteered* model minus that of the unsteered
            generations, averaged over the generation prompts (paired), in nats per token.
            NaN when no generations were made (``max_new_tokens=0``).
        nll: ``[C]`` the mean per-token NLL itself (unsteered model reading each coefficient's text).
        prompt_scores: ``[P][C]`` every prompt's score at every coefficient.
        prompts: ``[P]`` the prompt texts (the question, before the chat template).
        labels: ``[P]`` +1 / -1 orientation of each prompt.
        gen_prompts: ``[G]`` the open-ended prompts generated from.
        samples: ``{coeff: [G] generated texts}``.
        metadata: model, vector metadata, settings.
    """

    coeffs: list[float]
    effect: float
    effect_se: float
    scores: list[float]
    score_se: list[float]
    delta_nll: list[float]
    delta_nll_se: list[float]
    nll: list[float]
    prompt_scores: list[list[float]]
    prompts: list[str]
    labels: list[int]
    gen_prompts: list[str] = field(default_factory=list)
    samples: dict[float, list[str]] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    # --- views --------------------------------------------------------------------------

    @property
    def slopes(self) -> list[float]:
        """``[P]`` each prompt's slope (the numbers ``effect`` averages)."""
        return per_prompt_slopes(self.coeffs, self.prompt_scores).tolist()

    def summary(self) -> str:
        name = _one_line(self.metadata.get("name") or self.metadata.get("concept") or "vector")
        return (f"{name}: effect {_fmt(self.effect, self.effect_se)} nats per unit coefficient "
                f"({counted(len(self.prompts), 'prompt')}, "
                f"{counted(len(self.gen_prompts), 'generation prompt')})")

    def table(self) -> str:
        """Markdown table: one row per coefficient (score ± SE, ΔNLL ± SE, a sample)."""
        lines = [self.summary(), "",
                 "| coeff | score (nats) | ΔNLL (nats/token) | sample |",
                 "|---:|---:|---:|:---|"]
        for j, c in enumerate(self.coeffs):
            texts = self.samples.get(c) or []
            sample = _cell(texts[0], 60) if texts else ""
            lines.append(f"| {coeff_text(c)} | {_fmt(self.scores[j], self.score_se[j])} | "
                         f"{_fmt(self.delta_nll[j], self.delta_nll_se[j])} | {sample} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    # --- serialisation ------------------------------------------------------------------

    def to_dict(self) -> dict:
        return _clean({
            "format": REPORT_FORMAT,
            "kind": "eval",
            "coeffs": self.coeffs,
            "effect": self.effect,
            "effect_se": self.effect_se,
            "scores": self.scores,
            "score_se": self.score_se,
            "delta_nll": self.delta_nll,
            "delta_nll_se": self.delta_nll_se,
            "nll": self.nll,
            "prompts": [{"prompt": p, "label": lab, "scores": s}
                        for p, lab, s in zip(self.prompts, self.labels, self.prompt_scores)],
            "gen_prompts": self.gen_prompts,
            "samples": [{"coeff": c, "texts": self.samples[c]} for c in self.coeffs
                        if c in self.samples],  # none without generations: loads back as {}
            "metadata": self.metadata,
        })

    @classmethod
    def from_dict(cls, data: dict) -> EvalReport:
        if isinstance(data, dict) and data.get("kind") == "comparison":
            raise ValueError("this is a comparison of several vectors (steerkern.compare): read it with "
                             "ComparisonReport.load / from_dict")
        if not isinstance(data, dict) or data.get("kind") != "eval":
            raise ValueError("not an EvalReport dict (expected 'kind': 'eval', as written by to_dict)")
        try:
            floats = lambda key: [_float(v) for v in data[key]]  # noqa: E731
            texts = lambda value: value if isinstance(value, list) else _not_a_list(value)  # noqa: E731
            labels = [p["label"] for p in data["prompts"]]
            if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in labels):
                raise ValueError(f"labels must be +1 or -1, got {labels!r:.80}")
            metadata = data.get("metadata", {})
            if not isinstance(metadata, dict):
                raise TypeError(f"'metadata' must be a dict, got {type(metadata).__name__}")
            return _check_read(cls(
                coeffs=floats("coeffs"), effect=_float(data["effect"]),
                effect_se=_float(data["effect_se"]), scores=floats("scores"),
                score_se=floats("score_se"), delta_nll=floats("delta_nll"),
                delta_nll_se=floats("delta_nll_se"), nll=floats("nll"),
                prompt_scores=[[_float(v) for v in p["scores"]] for p in data["prompts"]],
                prompts=[p["prompt"] for p in data["prompts"]],
                labels=[int(v) for v in labels],
                gen_prompts=list(texts(data.get("gen_prompts", []))),
                samples={_float(s["coeff"]): list(texts(s["texts"])) for s in data.get("samples", [])},
                metadata=dict(metadata),
            ))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"damaged EvalReport dict: {error!r}") from None

    @classmethod
    def load(cls, path) -> EvalReport:
        """Read ``report.json`` (or a directory holding one) written by :meth:`save`."""
        return cls.from_dict(_read_json(path))

    def plot(self, path) -> Path:
        """Write a PNG: score (left) and ΔNLL (right) against the coefficient, with SE bars."""
        label = self.metadata.get("name") or self.metadata.get("concept") or "vector"
        return _plot(path, self.coeffs, {label: self}, title=self.summary())

    def samples_markdown(self) -> str:
        lines = ["## Generations", ""]
        for g, prompt in enumerate(self.gen_prompts):
            lines += [f"### {_one_line(prompt)}", "", "| coeff | text |", "|---:|:---|"]
            for c in self.coeffs:
                texts = self.samples.get(c) or []
                text = _cell(texts[g], 400) if g < len(texts) else ""
                lines.append(f"| {coeff_text(c)} | {text} |")
            lines.append("")
        return "\n".join(lines)

    def save(self, directory) -> Path:
        """Write ``table.md`` (table and generations), ``report.json`` and ``plot.png`` into
        ``directory`` (created if needed), all three or none: a failure (e.g. the plot) leaves
        no partial report and an existing ``directory`` as it was; its other files are left
        alone. Returns the directory."""
        return _save(directory, self.table() + "\n\n" + self.samples_markdown(), self.to_dict(), self.plot)


@dataclass
class ComparisonReport:
    """The result of :func:`steerkern.compare`: several vectors swept over the same
    coefficients in one batch. ``reports[name]`` is each vector's :class:`EvalReport`; the
    unsteered rows (coefficient 0) are shared by all of them."""

    reports: dict[str, EvalReport]

    def __post_init__(self):
        if not isinstance(self.reports, dict) or not self.reports:
            raise ValueError("reports must be a non-empty {name: EvalReport} dict")
        for name, report in self.reports.items():
            if not isinstance(report, EvalReport):
                raise TypeError(f"reports[{name!r}] must be an EvalReport, got {type(report).__name__}")
        first = next(iter(self.reports.values())).coeffs
        for name, report in self.reports.items():
            if list(report.coeffs) != list(first):
                raise ValueError(f"reports[{name!r}] has coeffs {report.coeffs}, the others {first}: "
                                 "a comparison sweeps every vector over the same coefficients")

    @property
    def coeffs(self) -> list[float]:
        return next(iter(self.reports.values())).coeffs

    @property
    def names(self) -> list[str]:
        return list(self.reports)

    def table(self) -> str:
        """Markdown: an effect line per vector, then one row per coefficient with every
        vector's score and ΔNLL side by side."""
        lines = [f"- {_one_line(name)}: effect {_fmt(r.effect, r.effect_se)} nats per unit coefficient"
                 for name, r in self.reports.items()]
        header = "| coeff | " + " | ".join(f"{_cell(n)} score | {_cell(n)} ΔNLL" for n in self.names) + " |"
        lines += ["", header, "|---:|" + "---:|---:|" * len(self.names)]
        for j, c in enumerate(self.coeffs):
            cells = [f"{_fmt(r.scores[j], r.score_se[j])} | {_fmt(r.delta_nll[j], r.delta_nll_se[j])}"
                     for r in self.reports.values()]
            lines.append(f"| {coeff_text(c)} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict:
        return {"format": REPORT_FORMAT, "kind": "comparison",
                "reports": {name: r.to_dict() for name, r in self.reports.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> ComparisonReport:
        if isinstance(data, dict) and data.get("kind") == "eval":
            raise ValueError("this is one vector's report (steerkern.evaluate): read it with "
                             "EvalReport.load / from_dict")
        if not isinstance(data, dict) or data.get("kind") != "comparison":
            raise ValueError("not a ComparisonReport dict (expected 'kind': 'comparison')")
        reports = data.get("reports")
        if not isinstance(reports, dict) or not reports:
            raise ValueError("damaged ComparisonReport dict: 'reports' must map names to EvalReport dicts")
        return cls({str(name): EvalReport.from_dict(r) for name, r in reports.items()})

    @classmethod
    def load(cls, path) -> ComparisonReport:
        return cls.from_dict(_read_json(path))

    def plot(self, path) -> Path:
        return _plot(path, self.coeffs, self.reports, title="steering comparison")

    def save(self, directory) -> Path:
        """Write ``table.md``, ``report.json`` and ``plot.png`` into ``directory``, all three or
        none, as :meth:`EvalReport.save` does. Returns the directory."""
        text = self.table() + "\n"
        for name, report in self.reports.items():
            text += f"\n# {_one_line(name)}\n\n" + report.samples_markdown()
        return _save(directory, text, self.to_dict(), self.plot)


def _read_json(path) -> dict:
    path = checks.path(path, "path", what="the path of a report.json or of the directory holding it")
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"no report at {str(path)!r}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{str(path)!r} is not valid JSON: {error}") from None


REPORT_FILES = ("table.md", "report.json", "plot.png")


def _save(directory, markdown: str, data: dict, plot) -> Path:
    """Write :data:`REPORT_FILES` into ``directory``, all three or none: they are written
    into a new staging directory first, once all three are written either renamed to
    ``directory`` (a sibling of it, when ``directory`` did not exist) or moved over the files of
    an existing ``directory`` (a hidden directory inside it, so that neither a read-only parent
    nor a mount point stops the save; its other files left alone). A failure (the plot, a full
    disk) removes the staging directory and any parent directories this call created, and
    leaves an existing ``directory`` as it was.

    Raises:
        TypeError / ValueError: ``directory`` is not a path, is a file or lies under one.
    """
    directory = checks.path(directory, "directory", what="the directory to write the report into")
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"save: {str(directory)!r} is a file; give a directory to write into")
    parent = directory.absolute().parent
    created = []  # parent directories this call makes, deepest last
    ancestor = parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        created.insert(0, ancestor)
        ancestor = ancestor.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"save: {str(directory)!r} lies under a file; give a directory to write into") from None
    existed = directory.is_dir()
    staging = (directory / f".report.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial" if existed
               else parent / f".{directory.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
    try:
        staging.mkdir()
        (staging / "table.md").write_text(markdown.rstrip() + "\n", encoding="utf-8")
        (staging / "report.json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n",
                                             encoding="utf-8")
        plot(staging / "plot.png")
        if not existed:
            try:
                os.rename(staging, directory)  # the whole new directory appears at once
            except OSError:  # made meanwhile by someone else: fill it as an existing one
                directory.mkdir(exist_ok=True)
        if staging.exists():
            for name in REPORT_FILES:
                os.replace(staging / name, directory / name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # before the parents it lies in
        for made in reversed(created):
            try:
                made.rmdir()
            except OSError:
                break
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _plot(path, coeffs, reports: dict[str, EvalReport], title: str) -> Path:
    """Write :func:`_figure` as a PNG at ``path`` (parent directories created)."""
    path = checks.path(path, "path", what="the file path of the PNG to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    _figure(coeffs, reports, title).savefig(path, format="png")
    return path


def _figure(coeffs, reports: dict[str, EvalReport], title: str):
    """Two panels, score and ΔNLL against the coefficient (points joined in increasing
    coefficient order), one line per report; names and titles are shown literally. Rendered
    with the Agg canvas directly: no display, and no change to pyplot's backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(figure)  # render with Agg, never touching pyplot's global backend
    score_ax, nll_ax = figure.subplots(1, 2)
    order = np.argsort(np.asarray(coeffs, dtype=np.float64), kind="stable")  # lines left to right
    x = np.asarray(coeffs, dtype=np.float64)[order]
    along = lambda values: np.asarray(values, dtype=np.float64)[order]  # noqa: E731
    # legends are given their entries explicitly: matplotlib skips labels starting with "_"
    score_entries, nll_entries = [], []
    for name, report in reports.items():
        label = _literal(_one_line(name, 60))
        line = score_ax.errorbar(x, along(report.scores), yerr=np.nan_to_num(along(report.score_se)),
                                 marker="o", capsize=3)
        score_entries.append((line, f"{label} (slope {_fmt(report.effect, report.effect_se, 2)})"))
        if np.isfinite(along(report.delta_nll)).any():
            line = nll_ax.errorbar(x, along(report.delta_nll), yerr=np.nan_to_num(along(report.delta_nll_se)),
                                   marker="o", capsize=3)
            nll_entries.append((line, label))
    score_ax.set(xlabel="steering coefficient", ylabel="score (nats)",
                 title="behaviour: log p(yes) - log p(no), oriented")
    nll_ax.set(xlabel="steering coefficient", ylabel="ΔNLL (nats / token)",
               title="coherence cost vs unsteered text")
    for ax in (score_ax, nll_ax):
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.grid(alpha=0.3)
    score_ax.legend(*zip(*score_entries), fontsize=8)
    if nll_entries:
        nll_ax.legend(*zip(*nll_entries), fontsize=8)
    else:  # the zero line alone: say why the panel is empty
        nll_ax.text(0.5, 0.5, "not measured (max_new_tokens=0)", transform=nll_ax.transAxes,
                    ha="center", va="center", color="grey")
    figure.suptitle(_literal(_one_line(title, 110)), fontsize=10)
    figure.tight_layout()
    return figure
