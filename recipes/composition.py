"""Composed features: SDM heads over several models' features concatenated, against each model alone.

    python recipes/composition.py --output recipes/results/composition --overwrite   # ~4 min on 2 CPU cores
    python recipes/composition.py --task sentiment --sets minilm gemma minilm+gemma   # slow: Gemma over reviews

Fact checking (data/saplma; train = cities + elements + facts, calibration = inventions +
companies + animals, 10% of each file held out as the in-distribution test set, the LLM-generated
statements as the shifted set). Feature sets:

* ``attributes``: the 32 shipped Mixtral-derived numbers per statement;
* ``minilm``: all-MiniLM-L6-v2, mean pooling of the final layer (384);
* ``gemma``: Gemma 3 270M, layer 9, concat(mean, final token) (1,280);
* ``minilm+gemma``: both models' features concatenated (384 + 1,280), computed with
  ``sdm_hf.extract_composed_features([minilm, gemma], texts, cache=True)``; its blocks are
  checked to equal the single-model features bit for bit;
* ``attributes+gemma``: the attributes and the Gemma block joined with ``sdm_hf.compose_features``
  (the attributes come from no model, so they are composed as a precomputed block).

Every set gets an SDM head with the same splits, seed and fit settings, once per normalisation:
``scalar`` (one mean / std over all elements, the default) and ``feature`` (per column). Under
``scalar`` a composed set is dominated by its block with the largest magnitudes (Gemma's hidden
states have a standard deviation of ~400, MiniLM's ~0.3), so both are shown. Each head is
recalibrated (not retrained) over an alpha grid; reported per set: the head's accuracy, a linear
probe's accuracy (per-feature standardised, cross-entropy: how much the features hold), and the
HR region's admitted share with its class-conditional accuracies, in distribution and shifted.

Time: about 4 minutes on 2 CPU cores with the features cached (10 fits of 8-33 s; computing the
features first adds about 20 s for MiniLM and 2 minutes for Gemma).

Writes results.md, results.json (the settings, layouts and one row per feature set, normalisation,
test set and alpha with raw counts), admitted_vs_alpha.png and COMMAND.md to --output.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import feature_sets  # noqa: E402
import sentiment_data  # noqa: E402
from sdm_experiment import FeatureSet, FitSettings  # noqa: E402

from sdm_hf import FeatureEncoder, SDMConfig, compose_features, extract_composed_features, fit_sdm_head  # noqa: E402
from sdm_hf.evaluation.metrics import selective_counts, significantly_below  # noqa: E402
from sdm_hf.features.layout import split_feature_blocks  # noqa: E402
from sdm_hf.training.baselines import fit_linear_probe, sdm_rules  # noqa: E402
from sdm_hf.utils.counting import accuracy_or_none, format_accuracy  # noqa: E402
from sdm_hf.utils.output_dir import check_output_dir, replacing_output_dir  # noqa: E402

DEFAULT_SETS = {
    "factcheck": ["attributes", "minilm", "gemma", "minilm+gemma", "attributes+gemma"],
    "sentiment": ["minilm", "gemma", "minilm+gemma"],
}
ALPHAS = (0.8, 0.85, 0.9, 0.94, 0.95, 0.97)
TABLE_ALPHAS = (0.9, 0.95)
NORMALIZATIONS = ("scalar", "feature")
FIT_ALPHA = 0.95  # the alpha the heads are fitted at (as in the other recipes); then recalibrated per alpha
ATTRIBUTES = {"model": feature_sets.recipe_of("attributes", 0)["base_model"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(DEFAULT_SETS), default="factcheck")
    p.add_argument("--sets", nargs="+", default=None, help="feature sets; '+' joins parts (default: all of the task's)")
    p.add_argument("--normalizations", nargs="+", choices=NORMALIZATIONS, default=list(NORMALIZATIONS))
    p.add_argument("--epochs", type=int, default=40, help="epochs per shuffle (papers: 200)")
    p.add_argument("--shuffles", type=int, default=1, help="shuffles J (papers: 10)")
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS))
    p.add_argument("--gemma-layer", type=int, default=feature_sets.DEFAULT_GEMMA_LAYER)
    p.add_argument("--max-length", type=int, default=feature_sets.DEFAULT_MAX_LENGTH)
    p.add_argument("--limit", type=int, default=None, help="at most this many rows per file (smoke runs)")
    p.add_argument("--tweets-per-class", type=int, default=1000, help="sentiment: shifted tweets per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="outputs/composition")
    p.add_argument("--overwrite", action="store_true", help="replace an output folder this program wrote")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    args.sets = args.sets or DEFAULT_SETS[args.task]
    for name in args.sets:
        parts = name.split("+")
        if any(part not in feature_sets.FEATURES for part in parts) or len(set(parts)) != len(parts):
            p.error(f"feature set {name!r}: join distinct parts of {feature_sets.FEATURES} with '+'")
        if args.task == "sentiment" and "attributes" in parts:
            p.error("the attributes exist only for the fact-checking statements")
    if not all(0.5 < a <= 1 for a in args.alphas):
        p.error("every alpha must be in (0.5, 1]")
    args.alphas = sorted(set(args.alphas) | set(TABLE_ALPHAS))
    return args


# -- feature sets -------------------------------------------------------------------------
def encoder_of(part: str, layer: int, max_length: int, progress: bool) -> FeatureEncoder:
    """The encoder ``feature_sets.embed`` uses for ``part`` (same name, so the same cache entries)."""
    if part == "gemma":
        model, tokenizer = feature_sets.gemma_model(progress)
        return FeatureEncoder(
            model, tokenizer, pooling="mean_last", layer=layer, max_length=max_length, name=feature_sets.GEMMA_NAME
        )
    model, tokenizer = feature_sets.minilm_model()
    return FeatureEncoder(
        model, tokenizer, pooling="mean", layer=-1, max_length=max_length, batch_size=64, name=feature_sets.MINILM_NAME
    )


def split_x(fs: FeatureSet, split: str) -> torch.Tensor:
    """``[N, D]`` features of one split (train, calibration or a test set) of ``fs``."""
    if split == "train":
        return fs.train_x
    return fs.calib_x if split == "calibration" else fs.tests[split].x


def composed_feature_set(name: str, singles: dict[str, FeatureSet], splits: dict, args) -> tuple[FeatureSet, list]:
    """The feature set ``name`` (parts joined by '+') and its layout. Model parts are computed in one
    ``extract_composed_features`` call (cache hits after the single-model sets); the attributes, which
    come from no model, are joined with ``compose_features``. Every block is checked to equal the
    part's own features."""
    started = time.perf_counter()
    parts = name.split("+")
    models = [p for p in parts if p != "attributes"]
    encoders = [encoder_of(p, args.gemma_layer, args.max_length, not args.no_progress) for p in models]
    xs, layout = {}, None
    for split, data in splits.items():
        blocks = {}
        if models:
            x_models, model_layout = extract_composed_features(
                encoders, sentiment_data.column(data, "document"), cache=True, progress=not args.no_progress
            )
            for part, block, info in zip(models, split_feature_blocks(x_models, model_layout), model_layout):
                blocks[part] = (block, {k: info[k] for k in ("model", "revision", "pooling", "layer", "max_length")})
        if "attributes" in parts:
            blocks["attributes"] = (split_x(singles["attributes"], split), ATTRIBUTES)
        xs[split], layout = compose_features([blocks[p][0] for p in parts], [blocks[p][1] for p in parts])
        for part, block in zip(parts, split_feature_blocks(xs[split], layout)):
            if not torch.equal(block, split_x(singles[part], split)):
                raise RuntimeError(f"{name}: the {part} block of {split} differs from the {part} features alone")
    base = singles[parts[0]]
    fs = FeatureSet(
        name=name,
        task=base.task,
        train_x=xs["train"],
        train_y=base.train_y,
        calib_x=xs["calibration"],
        calib_y=base.calib_y,
        tests={k: type(t)(x=xs[k], y=t.y, texts=t.texts, shifted=t.shifted) for k, t in base.tests.items()},
        id2label=base.id2label,
        train_texts=base.train_texts,
        calib_texts=base.calib_texts,
        recipe={"feature_blocks": layout},
        resplit=base.resplit,
        seconds=time.perf_counter() - started,
    )
    return fs, layout


# -- fit and evaluate ---------------------------------------------------------------------
def fit_and_evaluate(fs: FeatureSet, normalization: str, settings: FitSettings, alphas) -> tuple[list[dict], dict]:
    """Fit one SDM head on ``fs`` and count its HR region on every test set at every alpha."""
    started = time.perf_counter()
    config = SDMConfig(
        input_dim=fs.train_x.shape[1],
        num_classes=len(fs.id2label),
        alpha=FIT_ALPHA,
        id2label=fs.id2label,
        normalization=normalization,
        **fs.recipe,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an empty HR region at the fit's alpha is a result here
        head = fit_sdm_head(
            fs.train_x,
            fs.train_y,
            fs.calib_x,
            fs.calib_y,
            config,
            resplit=fs.resplit,
            train_texts=fs.train_texts,
            calib_texts=fs.calib_texts,
            procedure="paper",  # fixed settings: the comparison is between feature sets and normalisations
            epochs=settings.epochs,
            shuffles=settings.shuffles,
            learning_rate=settings.learning_rate,
            seed=settings.seed,
            progress=settings.progress,
        )
    all_x, all_y = torch.cat([fs.train_x, fs.calib_x]), torch.cat([fs.train_y, fs.calib_y])
    sup = head.selection["support_rows"]
    probe = fit_linear_probe(all_x[sup], all_y[sup], num_classes=len(fs.id2label), seed=settings.seed)
    rows = []
    with torch.no_grad():
        probe_right = {name: int((probe(t.x).argmax(1) == t.y).sum()) for name, t in fs.tests.items()}
    for alpha in alphas:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            head.recalibrate(alpha=alpha)
        for name, test in fs.tests.items():
            with torch.no_grad():
                out = head.predict(test.x)  # the HR region of the current calibration (this alpha)
            prediction, admit = sdm_rules(out, alpha)["sdm HR"]
            rows.append(
                {
                    "features": fs.name,
                    "normalization": normalization,
                    "dim": int(fs.train_x.shape[1]),
                    "task": fs.task,
                    "test_set": name,
                    "shifted": test.shifted,
                    "alpha": alpha,
                    "head_correct": int((out.prediction == test.y).sum()),
                    "probe_correct": probe_right[name],
                    **selective_counts(test.y, prediction, admit, len(fs.id2label), fs.id2label),
                }
            )
    info = {
        "features": fs.name,
        "normalization": normalization,
        "fit_seconds": round(time.perf_counter() - started, 1),
        "kept_shuffle": head.selection["shuffle"],
        "kept_epoch": head.selection["epoch"],
    }
    return rows, info


# -- rendering ----------------------------------------------------------------------------
def _class_cell(group: dict, alpha: float) -> str:
    accuracy = accuracy_or_none(group["correct"], group["admitted"])
    if accuracy is None:
        return f"R (0 of {group['n']})"
    mark = "↓" if significantly_below(group["correct"], group["admitted"], alpha) else ""
    return f"{format_accuracy(accuracy)}{mark} ({group['admitted']} of {group['n']})"


def _share_cell(row: dict) -> str:
    accuracy = accuracy_or_none(row["correct"], row["admitted"])
    return f"{row['admitted'] / max(row['n'], 1):.1%}" + (f", acc. {format_accuracy(accuracy)}" if accuracy else "")


def render_tables(rows: list[dict]) -> str:
    lines = []
    labels = list(rows[0]["per_class"])
    for test in dict.fromkeys(r["test_set"] for r in rows):
        mine = [r for r in rows if r["test_set"] == test]
        lines.append(f"\n## {test}: {mine[0]['n']} statements{' (shifted)' if mine[0]['shifted'] else ''}\n")
        head = ["features", "D", "normalisation", "head acc.", "probe acc."]
        for alpha in TABLE_ALPHAS:
            head += [f"HR α={alpha}: admitted"] + [f"α={alpha}: y={c}" for c in labels]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for features, normalization in dict.fromkeys((r["features"], r["normalization"]) for r in mine):
            by_alpha = {
                r["alpha"]: r for r in mine if r["features"] == features and r["normalization"] == normalization
            }
            first = next(iter(by_alpha.values()))
            cells = [features, str(first["dim"]), normalization]
            cells += [
                format_accuracy(first["head_correct"] / first["n"]),
                format_accuracy(first["probe_correct"] / first["n"]),
            ]
            for alpha in TABLE_ALPHAS:
                r = by_alpha[alpha]
                cells += [_share_cell(r)] + [_class_cell(r["per_class"][c], alpha) for c in labels]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(rows, args, settings, layouts, fits, seconds) -> str:
    lines = ["# Composed features: several models concatenated vs each model alone\n"]
    lines.append(
        f"Task: {args.task}. SDM heads: J={settings.shuffles} x E={settings.epochs}, lr={settings.learning_rate}, "
        f"seed {settings.seed}, the same training / calibration split for every feature set; Gemma layer "
        f"{args.gemma_layer}, max length {args.max_length}. Each head is recalibrated (not retrained) at each alpha.\n"
    )
    lines.append(
        "Cells: `head acc.` / `probe acc.`: accuracy of the head's prediction / of a linear probe (per-feature "
        "standardised) on all points of the test set. `HR α: admitted`: share of the test set in the HR region "
        "(with its accuracy); `α: y=c`: class-conditional accuracy of the admitted points of true class c "
        "(admitted of that class's points); R = nothing admitted; ↓ = more than two binomial standard errors "
        "below alpha.\n"
    )
    lines.append(render_tables(rows))
    lines.append("\n## Layouts of the composed sets (SDMConfig.feature_blocks)\n")
    for name, layout in layouts.items():
        parts = ", ".join(f"{b['model']} [{b['start']}:{b['stop']}]" for b in layout)
        lines.append(f"- {name}: {parts}")
    lines.append("\n## Fits\n")
    lines += [
        f"- {f['features']} ({f['normalization']}): kept shuffle {f['kept_shuffle']} epoch {f['kept_epoch']}, "
        f"{f['fit_seconds']} s"
        for f in fits
    ]
    lines.append(f"\nTotal: {seconds:.0f} s.")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tests = list(dict.fromkeys(r["test_set"] for r in rows))
    sets = list(dict.fromkeys(r["features"] for r in rows))
    fig, axes = plt.subplots(2, len(tests), figsize=(6.2 * len(tests), 8.4), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for j, test in enumerate(tests):
        for i, features in enumerate(sets):
            for normalization, style in (("feature", "-"), ("scalar", ":")):
                mine = sorted(
                    (
                        r
                        for r in rows
                        if (r["test_set"], r["features"], r["normalization"]) == (test, features, normalization)
                    ),
                    key=lambda r: r["alpha"],
                )
                if not mine:
                    continue
                label = f"{features} ({normalization})"
                alphas = [r["alpha"] for r in mine]
                axes[0, j].plot(alphas, [r["admitted"] / r["n"] for r in mine], style, marker="o", ms=3,
                                color=cmap(i % 10), label=label)  # fmt: skip
                worst = [
                    min((g["correct"] / g["admitted"] if g["admitted"] else math.nan) for g in r["per_class"].values())
                    for r in mine
                ]  # NaN (a class with nothing admitted) is not drawn
                axes[1, j].plot(alphas, worst, style, marker="o", ms=3, color=cmap(i % 10), label=label)
        axes[0, j].set_title(f"{test}: HR region, admitted share", fontsize=10)
        axes[0, j].set_ylabel("admitted share of the test set")
        axes[1, j].set_title(f"{test}: lowest class-conditional accuracy (none admitted: not drawn)",
                             fontsize=9)  # fmt: skip
        axes[1, j].set_ylabel("lowest class-conditional accuracy")
        lo = min(r["alpha"] for r in rows)
        axes[1, j].plot([lo, 1], [lo, 1], color="grey", lw=0.8, ls="--", label="accuracy = alpha")
        for ax in axes[:, j]:
            ax.set_xlabel("alpha")
            ax.grid(alpha=0.25)
        axes[0, j].legend(fontsize=7)
    fig.suptitle("SDM heads over composed features vs each model alone (solid: per-feature normalisation, "
                 "dotted: scalar)", fontsize=11)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.output)
    try:
        check_output_dir(out_dir, args.overwrite)  # refuse before any long work
    except FileExistsError as err:
        raise SystemExit(f"error: {err}") from None
    settings = FitSettings(
        epochs=args.epochs,
        shuffles=args.shuffles,
        learning_rate=args.learning_rate,
        seed=args.seed,
        progress=not args.no_progress,
    )
    splits = feature_sets.task_splits(args.task, args.seed, args.limit, args.tweets_per_class)
    for name, data in splits.items():
        print(f"  {name:30s} {len(data):6d} rows")
    parts = list(dict.fromkeys(p for s in args.sets for p in s.split("+")))
    singles = {
        p: feature_sets.build_feature_set(
            args.task, p, splits, layer=args.gemma_layer, max_length=args.max_length, progress=not args.no_progress
        )
        for p in parts
    }
    for p, fs in singles.items():
        fs.name = p
    sets, layouts = {}, {}
    for name in args.sets:
        if "+" in name:
            sets[name], layouts[name] = composed_feature_set(name, singles, splits, args)
        else:
            sets[name] = singles[name]
        print(f"== {name}: {sets[name].train_x.shape[1]} dims", flush=True)
    rows, fits = [], []
    for name, fs in sets.items():
        for normalization in args.normalizations:
            print(f"-- fitting {name} ({normalization})", flush=True)
            job_rows, info = fit_and_evaluate(fs, normalization, settings, args.alphas)
            rows += job_rows
            fits.append(info)
    seconds = time.perf_counter() - started
    with replacing_output_dir(out_dir, args.overwrite, program="composition.py") as folder:
        results = {
            "settings": {k: v for k, v in vars(args).items() if k not in ("output", "overwrite", "no_progress")},
            "layouts": layouts,
            "fits": fits,
            "rows": rows,
        }
        (folder / "results.json").write_text(json.dumps(results, indent=1, allow_nan=False), encoding="utf-8")
        text = render_markdown(rows, args, settings, layouts, fits, seconds)
        (folder / "results.md").write_text(text, encoding="utf-8")
        plot(rows, folder / "admitted_vs_alpha.png")
        command = "HF_HUB_OFFLINE=1 .venv/bin/python recipes/composition.py " + shlex.join(
            sys.argv[1:] if argv is None else argv
        )
        (folder / "COMMAND.md").write_text(
            f"Produced by: `{command}`\n\n{torch.get_num_threads()} torch threads on {platform.machine()} "
            f"({platform.system()}), {seconds:.0f} s in all, {time.strftime('%Y-%m-%d')}.\n",
            encoding="utf-8",
        )
    print("\n" + text)
    print(f"wrote {out_dir}/ (results.md, results.json, admitted_vs_alpha.png, COMMAND.md) in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
