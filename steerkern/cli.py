"""The ``steerkern`` command: extract, generate, eval, demo.

Every subcommand loads the model given by ``--model`` (default: the embedded
SmolLM2-135M-Instruct, offline). Bad flags, missing or corrupt files end with exit status 2 and
a one-line message on stderr, never a traceback.

    steerkern demo                                   # the README's main job, ~1-2 min on CPU
    steerkern extract --concept honesty -o honesty.safetensors
    steerkern extract --pairs pairs.jsonl --method mean_diff --layers 10-14 -o v.gguf
    steerkern generate --vector honesty.safetensors --coeff -2 0 2 "Tell me about yourself."
    steerkern eval --vector honesty.safetensors --coeffs -2 -1 0 1 2 --out report/
    steerkern eval --vector v.safetensors --mwe persona/narcissism.jsonl --limit 100 --out r/
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
import textwrap
from pathlib import Path

EXIT_USAGE = 2
# Spelled here rather than imported: steerkern.directions / steerkern.models import torch, which
# would slow `--help` (tests/test_cli.py checks they agree).
EXTRACT_METHODS = ("mean_diff", "pca_diff", "pca_center", "logistic", "lowrank", "weight_svd", "grad")
RANK_METHODS = ("lowrank", "weight_svd")  # the methods --rank applies to
RESIDUAL = "residual"
FLOAT32_MAX = 3.4028234663852886e38  # steerkern.control.FLOAT32_MAX: coefficients are held as float32


class CLIError(Exception):
    """A user error with a one-line explanation (exit status 2)."""


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- argument types -------------------------------------------------------------------------


def _numbers(values: list[str], flag: str) -> list[float]:
    """``["-2", "-1,0", "1"]`` -> ``[-2.0, -1.0, 0.0, 1.0]`` (space- or comma-separated)."""
    numbers = []
    for value in values:
        for piece in str(value).split(","):
            if not piece.strip():
                continue
            try:
                number = float(piece)
            except ValueError:
                raise CLIError(f"{flag}: {piece!r} is not a number") from None
            if not math.isfinite(number) or abs(number) > FLOAT32_MAX:
                raise CLIError(f"{flag}: {piece.strip()!r} is not a finite float32 number "
                               f"(|c| <= {FLOAT32_MAX:.3g}): coefficients are held in float32")
            numbers.append(number)
    if not numbers:
        raise CLIError(f"{flag}: give at least one number")
    return numbers


_LAYER_PIECE = re.compile(r"^(-?\d+)(?:\s*-\s*(-?\d+))?$")


def _layers(text: str | None) -> list[int] | None:
    """``"10-14"``, ``"8,10,12"``, ``"8-10,14"`` or, counted from the last layer, ``"-3--1"``
    -> layer list (negative indices are resolved once the model's depth is known)."""
    if text is None:
        return None
    layers = []
    for piece in text.split(","):
        piece = piece.strip()
        match = _LAYER_PIECE.match(piece)
        if match is None:
            raise CLIError(f"--layers: {piece!r} is not a layer index or range like 10-14 or -3--1")
        start, stop = int(match[1]), int(match[2] if match[2] is not None else match[1])
        if (start < 0) != (stop < 0):
            raise CLIError(f"--layers: {piece!r} mixes an index from the first layer with one from "
                           "the last: write both ends the same way, like 10-14 or -5--1")
        if start > stop:
            raise CLIError(f"--layers: {piece!r} is an empty range: write it low-high, e.g. {stop}-{start}")
        layers.extend(range(start, stop + 1))
    if not layers:
        raise CLIError("--layers: give layer indices like 10-14 or 8,10,12")
    return layers


def _existing_file(path: str, flag: str) -> Path:
    file = Path(path).expanduser()
    if not file.exists():
        raise CLIError(f"{flag}: no such file {path!r}")
    if not file.is_file():
        raise CLIError(f"{flag}: {path!r} is not a file")
    return file


def _read_records(path: Path, flag: str) -> list:
    """The records of a JSON or JSONL file (``steerkern.data.json_records``, whatever the
    extension); a JSON object ``{"pairs"|"prompts": [...]}`` holds its list."""
    from steerkern.data import json_records

    try:
        records = [record for _, record in json_records(path)]
    except ValueError as error:
        raise CLIError(f"{flag}: {error}") from None
    if len(records) == 1 and isinstance(records[0], dict):
        wrapped = records[0].get("pairs", records[0].get("prompts"))
        records = wrapped if wrapped is not None else records
    if not isinstance(records, list) or not records:
        raise CLIError(f"{flag}: {str(path)!r} holds no records: expected a JSON list or one JSON object per line")
    return records


def _read_pairs(path: Path) -> list[tuple[str, str]]:
    """Pairs as ``{"chosen", "rejected"}`` objects (or ``{"positive", "negative"}``) or
    ``[chosen, rejected]`` lists."""
    pairs = []
    for i, record in enumerate(_read_records(path, "--pairs")):
        if isinstance(record, dict):
            chosen = record.get("chosen", record.get("positive"))
            rejected = record.get("rejected", record.get("negative"))
        elif isinstance(record, list) and len(record) == 2:
            chosen, rejected = record
        else:
            chosen = rejected = None
        if not (isinstance(chosen, str) and isinstance(rejected, str)
                and chosen.strip() and rejected.strip()):
            raise CLIError(f"--pairs: record {i + 1} of {str(path)!r} is not a pair of non-empty texts: use "
                           '{"chosen": "...", "rejected": "..."} or ["chosen", "rejected"]')
        pairs.append((chosen, rejected))
    return pairs


def _load_vector(path: str):
    from steerkern.vectors import SteeringVector

    file = _existing_file(path, "--vector")
    try:
        with open(file, "rb") as handle:
            head = handle.read(9)
        # the content decides where it is recognisable (GGUF's magic; safetensors' 8-byte header
        # length then its JSON), else the name
        if head[:4] == b"GGUF" or (file.suffix.lower() == ".gguf" and head[8:9] != b"{"):
            return SteeringVector.from_gguf(file)
        return SteeringVector.load(file)
    except (ValueError, OSError, KeyError) as error:
        raise CLIError(f"--vector: cannot read {path!r}: {error}") from None


def _check_vector_fits(vector, model) -> None:
    """A vector whose layers or widths the loaded model lacks, refused naming ``--vector``."""
    try:
        vector.validate(model)
    except ValueError as error:
        raise CLIError(f"--vector: {error}") from None


def _load_model(args):
    from steerkern.models import load_model

    _log(f"loading model {args.model or 'SmolLM2-135M-Instruct (default)'} ...")
    kwargs = {"dtype": args.dtype} if getattr(args, "dtype", None) else {}
    try:
        return load_model(args.model, **kwargs)
    except ValueError as error:
        raise CLIError(f"--model: {error}") from None


def _check_writable(path: Path, flag: str, shown: str) -> None:
    """Refuse, before any model is loaded, a ``path`` that cannot be created: an ancestor that
    is a file, or a nearest existing directory that does not take new files."""
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CLIError(f"{flag}: cannot write {shown!r}: {str(ancestor)!r} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as error:
        raise CLIError(f"{flag}: cannot write {shown!r}: {str(ancestor)!r} does not take new files "
                       f"({error.strerror or error}); choose another location") from None


def _output_file(output: str) -> Path:
    """``-o/--output``, checked before any model is loaded: a .safetensors or .gguf name that
    is not a directory, in a place that can be written (missing directories are created)."""
    path = Path(output).expanduser()
    if path.name.lower() in (".safetensors", ".gguf"):
        raise CLIError(f"-o/--output: {output!r} has no name before its extension: give one, "
                       f"e.g. vector{path.name.lower()}")
    if path.suffix.lower() not in (".safetensors", ".gguf"):
        raise CLIError(f"-o/--output: {output!r} must end in .safetensors or .gguf")
    if path.is_dir():
        raise CLIError(f"-o/--output: {output!r} is a directory; give a file name ending in .safetensors or .gguf")
    _check_writable(path, "-o/--output", output)
    return path


def _save_vector(vector, output: str) -> Path:
    from safetensors import SafetensorError

    path = _output_file(output)
    try:
        if path.suffix.lower() == ".gguf":
            vector.to_gguf(path)
        else:
            vector.save(path)
    except (OSError, SafetensorError) as error:
        raise CLIError(f"-o/--output: cannot write {output!r}: {' '.join(str(error).split())}") from None
    return path


# --- subcommands ----------------------------------------------------------------------------


def cmd_extract(args) -> int:
    from steerkern.data import concept_pairs, list_concepts, load_mwe, mwe_pairs
    from steerkern.eval_report import counted
    from steerkern.extract import extract

    output = _output_file(args.output)
    if args.concept is not None and args.concept not in list_concepts():
        raise CLIError(f"--concept: {args.concept!r} is not shipped; choose from {list_concepts()}")
    layers = _layers(args.layers)
    if output.suffix.lower() == ".gguf":
        _check_gguf_extraction(args.method, layers, args.target)
    _check_target(args.method, args.target)
    if args.rank is not None and args.method not in RANK_METHODS:
        raise CLIError(f"--rank applies to --method {' | '.join(RANK_METHODS)}; --method {args.method} "
                       "gives one direction per layer: drop --rank")
    if args.max_suffixes is not None and args.concept is None:
        raise CLIError("--max-suffixes applies to --concept (its persona pairs): drop it with --pairs or --mwe")
    if args.pairs is not None:
        pairs = _read_pairs(_existing_file(args.pairs, "--pairs"))
    elif args.mwe is not None:
        try:
            items = load_mwe(_existing_file(args.mwe, "--mwe"), limit=args.limit)
        except ValueError as error:
            raise CLIError(f"--mwe: {error}") from None
    model, tokenizer = _load_model(args)
    if output.suffix.lower() == ".gguf" and layers is not None and min(layers) < 0:
        from steerkern.models import check_layer  # a negative layer counts from the last

        _check_gguf_extraction(args.method, [check_layer(model, layer, "--layers") for layer in layers])
    if args.concept is not None:
        pairs = concept_pairs(args.concept, tokenizer, max_suffixes=args.max_suffixes)
    elif args.mwe is not None:
        pairs = mwe_pairs(items, tokenizer, concept=Path(args.mwe).stem)
    if args.limit is not None and args.mwe is None:
        pairs = pairs[: args.limit]
    try:
        vector = extract(model, tokenizer, pairs, layers=layers, method=args.method, rank=args.rank or 1,
                         target=args.target, progress=True, concept=args.name)
    except ValueError as error:
        raise CLIError(_in_flag_terms(" ".join(str(error).split()))) from None
    path = _save_vector(vector, args.output)
    print(f"wrote {path} ({vector!r}, {counted(len(pairs), 'pair')}, method {args.method})")
    return 0


def _in_flag_terms(message: str) -> str:
    """An ``extract`` error in the command's terms: its arguments (``rank=10``,
    ``target='mlp'``, ``extract(method='lowrank')``) as the flags that set them. Advice to
    change ``last_n_tokens`` is dropped: the command reads each text's last token and has no
    flag for it."""
    message = re.sub(r",? raise last_n_tokens( or|,)", r"\1", message)
    message = re.sub(r"\bextract\(method='([^']*)'\)", r"--method \1", message)
    return re.sub(r"(?<![-\w])(layers|method|rank|target)=('?)([^'\s,:]*)\2", r"--\1 \3", message)


def _check_target(method: str, target: str) -> None:
    """``--method weight_svd`` expresses the direction in a Linear module's weight basis: it
    needs ``--target`` naming one (refused before any model is loaded)."""
    if method == "weight_svd" and target == RESIDUAL:
        raise CLIError("--method weight_svd needs --target naming a linear sub-module of each layer "
                       "(e.g. --target mlp.down_proj or --target self_attn.o_proj)")


def _check_gguf_extraction(method: str, layers: list[int] | None, target: str = RESIDUAL) -> None:
    """What a .gguf control vector cannot hold, refused before any model is loaded."""
    from steerkern.directions import ADDITIVE_METHODS

    if target != RESIDUAL:
        raise CLIError(f"-o/--output: a .gguf control vector steers the residual stream only, not "
                       f"--target {target}: write -o NAME.safetensors, or drop --target")
    if method not in ADDITIVE_METHODS:
        raise CLIError(f"-o/--output: a .gguf control vector holds additive vectors only, and --method "
                       f"{method} gives low-rank parts: write -o NAME.safetensors, or use --method "
                       f"{' | '.join(ADDITIVE_METHODS)}")
    if layers is not None and 0 in layers:
        raise CLIError("--layers: llama.cpp's .gguf control vectors cannot steer layer 0: drop it, "
                       "or write -o NAME.safetensors")


def _coeffs_then_prompts(values: list[str], prompts: list[str]) -> tuple[list[float], list[str]]:
    """``--coeff -2 0 2 "Tell me"`` hands argparse's ``--coeff`` the prompt too (it takes every
    following word): the leading numbers are the coefficients, the words from the first
    non-number on are prompts, after those given before ``--coeff``."""
    count = 0
    while count < len(values) and _is_number_list(values[count]):
        count += 1
    coeffs = _numbers(values[: max(count, 1)], "--coeff")
    prompts = list(prompts) + list(values[count:])
    if not prompts:
        raise CLIError('give at least one PROMPT, e.g. steerkern generate --vector v.safetensors "Tell me about yourself."')
    return coeffs, prompts


def cmd_generate(args) -> int:
    from steerkern.sweep import generate_rows

    coeffs, args.prompts = _coeffs_then_prompts(args.coeff, args.prompts)
    vector = _load_vector(args.vector)
    model, tokenizer = _load_model(args)
    _check_vector_fits(vector, model)
    arms = [(-1 if c == 0 else 0, c) for c in coeffs]
    texts, _ = generate_rows(model, tokenizer, [vector], args.prompts, arms,
                             max_new_tokens=args.max_new_tokens, positions=args.positions,
                             progress=True)
    print(side_by_side(args.prompts, coeffs, texts))
    return 0


def _sweep_coeffs(values: list[str]) -> list[float]:
    """``--coeffs`` checked as ``evaluate`` checks them (at least two, distinct, finite), before
    any model is loaded."""
    from steerkern.eval import _check_coeffs

    return _check_coeffs(_numbers(values, "--coeffs"), "--coeffs")


def _output_dir(path: str | None, flag: str) -> Path | None:
    """``flag``'s directory, refused up front when it names an existing file or cannot be
    created (the report would otherwise be computed and then not written)."""
    if path is None:
        return None
    directory = Path(path).expanduser()
    if directory.exists() and not directory.is_dir():
        raise CLIError(f"{flag}: {path!r} is a file; give a directory to write table.md, report.json and plot.png into")
    _check_writable(directory / "report.json", flag, path)
    return directory


def cmd_eval(args) -> int:
    from steerkern.data import list_concepts
    from steerkern.eval import evaluate

    coeffs = _sweep_coeffs(args.coeffs)
    out = _output_dir(args.out, "--out")
    vector = _load_vector(args.vector)
    prompts = None
    if args.prompts is not None:
        prompts = _read_records(_existing_file(args.prompts, "--prompts"), "--prompts")
    elif args.mwe is not None:
        from steerkern.data import load_mwe

        try:
            prompts = load_mwe(_existing_file(args.mwe, "--mwe"), limit=args.limit)
        except ValueError as error:
            raise CLIError(f"--mwe: {error}") from None
    elif not vector.metadata.get("concept"):
        raise CLIError("--prompts or --mwe is needed: the vector names no shipped concept")
    elif vector.metadata["concept"] not in list_concepts():
        raise CLIError(f"--prompts or --mwe is needed: the vector's concept "
                       f"{vector.metadata['concept']!r} ships no eval prompts (shipped: {list_concepts()})")
    model, tokenizer = _load_model(args)
    _check_vector_fits(vector, model)
    if prompts is None:
        from steerkern.data import concept_eval_prompts

        prompts = concept_eval_prompts(vector.metadata["concept"])
    if args.limit is not None:
        prompts = prompts[: args.limit]
    try:
        report = evaluate(model, tokenizer, vector, coeffs=coeffs, prompts=prompts,
                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                          positions=args.positions, progress=True)
    except (ValueError, TypeError) as error:
        source = "--prompts" if args.prompts is not None else "--mwe" if args.mwe is not None else None
        if source is None or not str(error).startswith("prompts"):
            raise
        raise CLIError(f"{source} {getattr(args, source[2:])!r}: {' '.join(str(error).split())} "
                       "(prompts[i] is the file's i-th record, counting from 0)") from None
    print(report)
    if out is not None:
        directory = report.save(out)
        print(f"\nwrote {directory / 'table.md'}, {directory / 'report.json'}, {directory / 'plot.png'}")
    return 0


def cmd_demo(args) -> int:
    from steerkern.data import concept_pairs, list_concepts
    from steerkern.eval import evaluate
    from steerkern.extract import extract

    if args.concept not in list_concepts():
        raise CLIError(f"--concept: {args.concept!r} is not shipped; choose from {list_concepts()}")
    coeffs = _sweep_coeffs(args.coeffs)
    _check_target(args.method, args.target)
    out = _output_dir(args.out, "--out")
    model, tokenizer = _load_model(args)
    pairs = concept_pairs(args.concept, tokenizer, max_suffixes=args.max_suffixes, cuts=1)
    _log(f"extracting '{args.concept}' ({args.method}) from {len(pairs)} contrast pairs ...")
    vector = extract(model, tokenizer, pairs, method=args.method, target=args.target, progress=True)
    _log(f"sweeping coefficients {coeffs} in one batch ...")
    report = evaluate(model, tokenizer, vector, coeffs=coeffs, max_new_tokens=args.max_new_tokens,
                      gen_prompts=DEMO_PROMPTS[: args.samples], progress=True)
    report.save(out)
    vector.save(out / f"{args.concept}.safetensors")
    print(report)
    if report.gen_prompts:  # none with --max-new-tokens 0
        print()
        print(side_by_side(report.gen_prompts, report.coeffs,
                           [report.samples[c] for c in report.coeffs]))
    print(f"\nwrote {out / 'plot.png'}, {out / 'table.md'}, {out / 'report.json'} and "
          f"{out / (args.concept + '.safetensors')}")
    return 0


DEMO_PROMPTS = (
    "Tell me about your weekend.",
    "What do you think of the city you live in?",
    "Describe your favourite meal.",
    "Write a short note to a friend who is moving away.",
)


def side_by_side(prompts, coeffs, texts, width: int | None = None) -> str:
    """Generations grouped by prompt, one wrapped paragraph per coefficient, aligned."""
    from steerkern.eval_report import coeff_text

    width = width or min(100, max(60, os.get_terminal_size(sys.__stdout__.fileno()).columns
                                  if sys.__stdout__ and sys.__stdout__.isatty() else 100))
    blocks = []
    for g, prompt in enumerate(prompts):
        lines = [f"== {prompt}"]
        for j, c in enumerate(coeffs):
            head = f"  coeff {coeff_text(c, sign=True)}: "
            body = " ".join(texts[j][g].split()) or "(empty)"
            wrapped = textwrap.wrap(body, width=width - len(head)) or [""]
            lines.append(head + wrapped[0])
            lines.extend(" " * len(head) + rest for rest in wrapped[1:])
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


# --- parser ---------------------------------------------------------------------------------


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs wrapped to the terminal line by line (their own line breaks
    kept); every option's help ends with its default, unless the default is ``None`` (the help
    then says what happens) or the help already states it."""

    def _fill_text(self, text, width, indent):
        return "\n".join(textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent)
                         if line.strip() else "" for line in text.splitlines())

    def _get_help_string(self, action):
        help = action.help or ""
        if action.default in (None, argparse.SUPPRESS) or "default" in help or action.required:
            return help
        default = " ".join(action.default) if isinstance(action.default, list) else "%(default)s"
        return f"{help} (default: {default})" if help else f"default: {default}"


def _is_number_list(text: str) -> bool:
    """``"-2"``, ``"-1,1"``, ``"-1e3"``, ``"-.5"``: one number or a comma-separated list."""
    pieces = [piece for piece in str(text).split(",") if piece.strip()]
    try:
        for piece in pieces:
            float(piece)
    except ValueError:
        return False
    return bool(pieces)


def _is_layer_list(text: str) -> bool:
    """``"-3--1"``, ``"-5--3,-1"``: layer indices and ranges as ``--layers`` reads them
    (:func:`_layers`)."""
    pieces = [piece.strip() for piece in str(text).split(",")]
    return all(_LAYER_PIECE.match(piece) for piece in pieces)


class _NumberLists:
    """What argparse asks (``parser._negative_number_matcher.match(arg)``) to tell a negative
    value from a flag. Its own pattern knows only ``-2`` and ``-2.5``, so ``--coeffs -1,1``,
    ``--coeffs -1e3 0`` or ``--layers -3--1`` would end with "expected at least one argument";
    this one accepts every token that starts with "-" and reads as numbers
    (:func:`_is_number_list`) or as layer indices and ranges (:func:`_is_layer_list`)."""

    @staticmethod
    def match(text: str) -> bool:
        return str(text).startswith("-") and (_is_number_list(text) or _is_layer_list(text))


class _Parser(argparse.ArgumentParser):
    """``ArgumentParser`` whose values may be negative numbers in any notation (``_NumberLists``);
    the subcommands' parsers are of the same class."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NumberLists()


def _model_flags(parser) -> None:
    parser.add_argument("--model", default=None,
                        help="Hugging Face model id, or local directory with config.json, weights and "
                             "tokenizer (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="weights dtype (default: the checkpoint's; float32 for the default model)")


def _target_flag(parser) -> None:
    parser.add_argument("--target", default=RESIDUAL, metavar="MODULE",
                        help="where the vector steers: the residual stream (decoder layer output) or a "
                             "sub-module of each layer (mlp.down_proj, self_attn.o_proj, ...; "
                             "--method weight_svd needs a linear one)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="steerkern", formatter_class=_Formatter,
        description="Activation steering for causal LMs: extract a steering vector, generate "
                    "with it, and measure what it does.",
        epilog="Run 'steerkern demo' for a one-minute tour on the embedded model.")
    from steerkern import __version__

    parser.add_argument("--version", action="version", version=f"steerkern {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("extract", formatter_class=_Formatter,
                       help="extract a steering vector from contrast pairs",
                       description="Extract a steering vector from contrast pairs and write it as "
                                   ".safetensors (steerkern's format) or .gguf (llama.cpp control vector).",
                       epilog="Pairs files: JSONL lines {\"chosen\": ..., \"rejected\": ...} (or "
                              "\"positive\"/\"negative\"), or a JSON list of such objects or of [chosen, "
                              "rejected] lists (also under a \"pairs\" key). Extraction reads each "
                              "text's last token.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--concept", help="a shipped concept (sentiment, honesty, formality, ...)")
    source.add_argument("--pairs", metavar="FILE", help="contrast pairs, .jsonl or .json")
    source.add_argument("--mwe", metavar="FILE", help="model-written-evals JSONL (CAA pairs at the answer token)")
    p.add_argument("--method", default="mean_diff", choices=EXTRACT_METHODS,
                   help="extraction method (default: mean_diff, as steerkern.extract; logistic: a linear "
                        "probe's direction, L2-regularised logistic regression of chosen vs rejected)")
    p.add_argument("--layers", default=None,
                   help="layers like 10-14 or 8,10,12; negative ones count from the last (-3--1: the last three) "
                        "(default: a middle band)")
    p.add_argument("--rank", type=int, default=None, help="rank for lowrank / weight_svd (default: 1)")
    _target_flag(p)
    p.add_argument("--limit", type=int, default=None, help="use at most this many pairs / items (default: all)")
    p.add_argument("--max-suffixes", type=int, default=None,
                   help="--concept: neutral suffixes per persona pair (default: all)")
    p.add_argument("--name", default=None,
                   help="concept name recorded in the vector's metadata (default: the --concept, or the --mwe file's name)")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="out.safetensors or out.gguf")
    _model_flags(p)
    p.set_defaults(run=cmd_extract)

    p = sub.add_parser("generate", formatter_class=_Formatter,
                       help="generate with a steering vector at one or more coefficients",
                       description="Generate greedily from each prompt (a user turn of the tokenizer's chat "
                                   "template where it has one, as evaluate renders it) at every coefficient, all in "
                                   "one batch, and print the texts side by side.")
    p.add_argument("prompts", nargs="*", metavar="PROMPT",
                   help="user prompt(s), before --coeff or after its numbers")
    p.add_argument("--vector", required=True, metavar="FILE", help=".safetensors or .gguf vector")
    p.add_argument("--coeff", nargs="+", default=["0", "2"], metavar="C",
                   help="coefficient(s); 0 is the unsteered model")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens to generate per text")
    p.add_argument("--positions", default="all", choices=("all", "prompt", "generated"),
                   help="tokens steered: all, only the prompt's, or only the generated ones")
    _model_flags(p)
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("eval", formatter_class=_Formatter,
                       help="sweep coefficients: behaviour score, effect slope, coherence",
                       description="Evaluate a vector over a coefficient sweep in one batch: "
                                   "log p(yes) - log p(no) on binary-choice prompts (oriented by "
                                   "label), its slope against the coefficient with a standard error "
                                   "paired by prompt, and ΔNLL of steered generations.",
                       epilog="Prompt files: JSON list or JSONL of {\"prompt\": ..., \"label\": 1|-1} "
                              "or model-written-evals items (where an item lists several answers for "
                              "a side, the score pools them). Without --prompts/--mwe the vector's "
                              "shipped concept prompts are used.")
    p.add_argument("--vector", required=True, metavar="FILE", help=".safetensors or .gguf vector")
    p.add_argument("--coeffs", nargs="+", default=["-2", "-1", "0", "1", "2"], metavar="C",
                   help="coefficients to sweep, space- or comma-separated")
    prompts = p.add_mutually_exclusive_group()
    prompts.add_argument("--prompts", metavar="FILE", help="labelled binary-choice prompts (.json/.jsonl)")
    prompts.add_argument("--mwe", metavar="FILE", help="model-written-evals JSONL (Yes/No or A/B)")
    p.add_argument("--limit", type=int, default=None, help="use at most this many prompts (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens per sample (0: skip ΔNLL)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="most rows per forward pass (default: as many as fit memory; on CPU, scoring "
                        "passes of about 4096 prompt tokens)")
    p.add_argument("--positions", default="all", choices=("all", "prompt", "generated"),
                   help="tokens steered: all, only the prompt's, or only the generated ones")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="write table.md, report.json, plot.png here (default: print only)")
    _model_flags(p)
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("demo", formatter_class=_Formatter,
                       help="extract a shipped concept, sweep it, plot it, show generations",
                       description="The main job in one command: extract a shipped concept's vector, "
                                   "sweep coefficients in one batch, print the table, write the plot, "
                                   "and show steered generations side by side.")
    p.add_argument("--concept", default="sentiment", help="shipped concept")
    p.add_argument("--method", default="mean_diff", choices=EXTRACT_METHODS, help="extraction method")
    _target_flag(p)
    p.add_argument("--coeffs", nargs="+", default=["-2", "-1", "0", "1", "2"], metavar="C",
                   help="coefficients to sweep")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per generated sample")
    p.add_argument("--samples", type=int, default=3, help="generation prompts (1-4)")
    p.add_argument("--max-suffixes", type=int, default=8, help="neutral suffixes per persona pair")
    p.add_argument("--out", default="steerkern-demo", metavar="DIR", help="output directory")
    _model_flags(p)
    p.set_defaults(run=cmd_demo)
    return parser


def _check_counts(args) -> None:
    for flag in ("limit", "max_suffixes", "batch_size", "rank"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise CLIError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    least = 1 if args.run is cmd_generate else 0  # eval and demo: 0 skips the ΔNLL
    if getattr(args, "max_new_tokens", least) < least:
        raise CLIError(f"--max-new-tokens must be >= {least}, got {args.max_new_tokens}")
    samples = getattr(args, "samples", None)
    if samples is not None and not 1 <= samples <= len(DEMO_PROMPTS):
        raise CLIError(f"--samples must be in 1..{len(DEMO_PROMPTS)}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``steerkern`` command. Returns the exit status (0 ok, 2 user error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, or argparse's own usage error (status 2)
        return int(exit_.code or 0)
    prefix = f"steerkern {args.command}: error:"
    try:
        _check_counts(args)
        return int(args.run(args) or 0)
    except CLIError as error:
        _log(f"{prefix} {error}")
    except FileNotFoundError as error:
        _log(f"{prefix} {error}")
    except (ValueError, TypeError, OSError) as error:
        _log(f"{prefix} {' '.join(str(error).split())}")
    except KeyboardInterrupt:
        _log("steerkern: interrupted")
        return 130
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
