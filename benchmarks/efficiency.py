"""Statistical efficiency of the SDM head's training procedures: admitted share vs validity.

    python benchmarks/efficiency.py                                   # every job, split, procedure
    python benchmarks/efficiency.py --procedures paper --splits 0     # one cell
    python benchmarks/efficiency.py --render-only                     # tables from the JSON

For every feature set (MiniLM on movie reviews, Gemma 3 270M layer 9 and the Mixtral-derived
attributes on fact checking), every random split (``--splits``: the split seed reshuffles the
held-out in-distribution test set and the head's train/calibration split) and every training
procedure (:data:`PROCEDURES`, or ``name=key:value,...`` on the command line), the head is fitted
once and measured on data it never saw:

* ``admitted``: the share of the in-distribution test set in the HR region at alpha 0.90 and
  0.95 (the head recalibrated per alpha, Algorithm 1 only), with the class-conditional accuracy
  of the admitted test points, and the admitted share of the shifted test set;
* validity over ``--draws`` recalibration draws (``recipes/sdm_experiment.resample_validity``:
  the head's calibration points and the in-distribution test set pooled, re-split at random,
  Algorithm 1 recalibrated on one part and evaluated on the other): per class the mean HR
  accuracy and the share of draws more than 2 binomial standard errors below alpha;
* the fit time on this machine.

Every finished cell is written to ``benchmarks/results/efficiency.json`` at once and reused by
later runs (keyed by job, split and the procedure's full settings), so procedures can be added
without refitting the others; ``--refit`` ignores the stored cells. The markdown tables
(``efficiency.md``) are rendered from the JSON only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "recipes"))
import feature_sets  # noqa: E402
from sdm_experiment import resample_validity  # noqa: E402

from sdm_hf import SDMConfig, fit_sdm_head  # noqa: E402
from sdm_hf.head.inference import hr_masks  # noqa: E402

JOBS = ("sentiment:minilm", "factcheck:gemma", "factcheck:attributes")
IN_DISTRIBUTION = "in-distribution"
ALPHAS = (0.9, 0.95)
# name -> fit_sdm_head keyword arguments (on top of the feature set's resplit and the split seed)
PROCEDURES: dict[str, dict] = {
    "auto": {"procedure": "auto"},
    "paper": {"procedure": "paper"},
    "fast": {"procedure": "fast"},
}
# procedure keys that go to SDMConfig, not fit_sdm_head
CONFIG_KEYS = ("normalization", "exemplar_dim", "min_class_points")


def parse_procedure(text: str) -> tuple[str, dict]:
    """``name=key:value,key:value`` -> (name, kwargs); values are parsed as JSON when they can be."""
    if "=" not in text:
        if text not in PROCEDURES:
            raise SystemExit(f"unknown procedure {text!r}; known: {sorted(PROCEDURES)}, or name=key:value,...")
        return text, dict(PROCEDURES[text])
    name, spec = text.split("=", 1)
    kwargs = {}
    for item in filter(None, spec.split(",")):
        key, value = item.split(":", 1)
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return name, kwargs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", nargs="+", default=list(JOBS), help="task:features")
    p.add_argument("--splits", type=int, nargs="+", default=[0, 1])
    p.add_argument("--procedures", nargs="+", default=list(PROCEDURES))
    p.add_argument("--draws", type=int, default=100)
    p.add_argument("--output", default=str(HERE / "results" / "efficiency"))
    p.add_argument("--refit", action="store_true")
    p.add_argument("--render-only", action="store_true")
    return p.parse_args(argv)


def cell_key(job: str, split: int, kwargs: dict) -> str:
    return json.dumps([job, split, kwargs], sort_keys=True)


def evaluate_head(head, fs, alphas) -> dict:
    """Admitted share and class-conditional accuracy of the HR region on the held-out sets."""
    out = {}
    for name, test in fs.tests.items():
        pred = head.predict(test.x)
        rows = {}
        for alpha in alphas:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                head.recalibrate(alpha=alpha)
            admit = hr_masks(pred, alpha, head.q_min, head.thresholds)[0]
            correct = pred.prediction == test.y
            per_class = {}
            for c, label in fs.id2label.items():
                in_c = test.y == c
                n_adm = int((admit & in_c).sum())
                per_class[label] = {
                    "n": int(in_c.sum()),
                    "admitted": n_adm,
                    "correct": int((admit & in_c & correct).sum()),
                }
            rows[str(alpha)] = {
                "n": int(test.y.numel()),
                "admitted": int(admit.sum()),
                "correct": int((admit & correct).sum()),
                "per_class": per_class,
            }
        out[name] = {"shifted": test.shifted, "accuracy": float((pred.prediction == test.y).float().mean()), **rows}
    return out


def run_cell(job: str, split: int, name: str, kwargs: dict, draws: int) -> dict:
    task, features = job.split(":", 1)
    fs = feature_sets.build_feature_set(task, features, feature_sets.task_splits(task, split), progress=False)
    config_kwargs = {k: v for k, v in kwargs.items() if k in CONFIG_KEYS}
    kwargs = {k: v for k, v in kwargs.items() if k not in CONFIG_KEYS}
    config = SDMConfig(input_dim=fs.train_x.shape[1], num_classes=len(fs.id2label), alpha=max(ALPHAS), **config_kwargs)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        head = fit_sdm_head(
            fs.train_x,
            fs.train_y,
            fs.calib_x,
            fs.calib_y,
            config,
            resplit=fs.resplit,
            seed=split,
            progress=False,
            **kwargs,
        )
    fit_s = time.perf_counter() - started
    held_out = evaluate_head(head, fs, ALPHAS)
    validity = resample_validity(fs, SimpleNamespace(head=head), IN_DISTRIBUTION, ALPHAS, draws=draws, seed=split)
    history = head.training_history
    return {
        "job": job,
        "features": fs.name,
        "split": split,
        "procedure": name,
        "kwargs": {**kwargs, **config_kwargs},
        "fit_seconds": round(fit_s, 1),
        "epochs_run": len(history),
        "kept": {k: head.selection[k] for k in ("shuffle", "epoch")},
        "n_calibration": len(head.selection["calibration_rows"]),
        "held_out": held_out,
        "validity": validity,  # the HR region ("sdm_hr") and its lower-bound variant ("sdm_hr_lower")
    }


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def main(argv=None) -> None:
    args = parse_args(argv)
    json_path = Path(args.output).with_suffix(".json")
    cells = load(json_path)
    if not args.render_only:
        torch.manual_seed(0)
        for job in args.jobs:
            for split in args.splits:
                for text in args.procedures:
                    name, kwargs = parse_procedure(text)
                    key = cell_key(job, split, kwargs)
                    if key in cells and not args.refit and cells[key]["validity"][0]["draws"] == args.draws:
                        continue
                    started = time.perf_counter()
                    cells[key] = run_cell(job, split, name, kwargs, args.draws)
                    cells[key]["procedure"] = name
                    json_path.write_text(json.dumps(cells, indent=1, sort_keys=True) + "\n")
                    print(
                        f"{job} split {split} {name}: fit {cells[key]['fit_seconds']:.0f} s, "
                        f"cell {time.perf_counter() - started:.0f} s",
                        flush=True,
                    )
    Path(args.output).with_suffix(".md").write_text(render(cells))


def _share(a: int, n: int) -> str:
    return f"{a / n:.1%}" if n else "-"


def render(cells: dict) -> str:
    from collections import defaultdict

    groups = defaultdict(list)  # (job, procedure) -> cells over splits
    for cell in cells.values():
        groups[(cell["job"], cell["procedure"])].append(cell)
    lines = [
        "# Training procedures: admitted share and validity on held-out data\n",
        "Per feature set and procedure, over the random splits listed: the share of the held-out "
        "in-distribution test set in the HR region (mean over splits, then each split), the "
        "class-conditional accuracy of those admitted test points (pooled over splits, worst class), "
        "the shifted test set's admitted share, and over the recalibration draws per split the "
        "mean class-conditional HR accuracy (worst class) and the share of draws in which some class "
        "is more than 2 binomial SE below alpha. Produced by `python benchmarks/efficiency.py`.\n",
    ]
    for alpha in ALPHAS:
        lines += [
            f"\n## alpha = {alpha}\n",
            "| features | procedure | splits | admitted (in-dist. test) | per split | worst-class acc. "
            "(admitted test) | shifted admitted | draws: worst-class mean acc. | draws: any class "
            "> 2 SE below | fit s | epochs run |",
            "|" + "---|" * 11,
        ]
        for (_job, procedure), group in sorted(groups.items()):
            group = sorted(group, key=lambda c: c["split"])
            shares, per_class_adm, per_class_cor, shifted = [], defaultdict(int), defaultdict(int), [0, 0]
            worst_draw, below = [], []
            for cell in group:
                test = cell["held_out"][IN_DISTRIBUTION][str(alpha)]
                shares.append(test["admitted"] / test["n"])
                for label, g in test["per_class"].items():
                    per_class_adm[label] += g["admitted"]
                    per_class_cor[label] += g["correct"]
                for res in cell["held_out"].values():
                    if res["shifted"]:
                        shifted[0] += res[str(alpha)]["admitted"]
                        shifted[1] += res[str(alpha)]["n"]
                v = next(r for r in cell["validity"] if r["alpha"] == alpha and r["estimator"] == "sdm_hr")
                accs = [g["mean_accuracy"] for g in v["per_class"].values() if g["mean_accuracy"] is not None]
                worst_draw.append(min(accs) if len(accs) == len(v["per_class"]) else None)
                below.append(v["share_draws_any_class_below"])
            accs = {k: per_class_cor[k] / per_class_adm[k] for k in per_class_adm if per_class_adm[k]}
            worst = min(accs.items(), key=lambda kv: kv[1]) if len(accs) == len(per_class_adm) else None
            worst_text = (
                f"{worst[1]:.3f} ({worst[0]}, {per_class_adm[worst[0]]})" if worst else "R (a class never admitted)"
            )
            draw_text = ", ".join("R" if w is None else f"{w:.3f}" for w in worst_draw)
            lines.append(
                f"| {group[0]['features']} | {procedure} | {len(group)} | {sum(shares) / len(shares):.1%} | "
                + " / ".join(f"{s:.1%}" for s in shares)
                + f" | {worst_text} | {_share(*shifted)} | {draw_text} | "
                + " / ".join(f"{b:.0%}" for b in below)
                + f" | {sum(c['fit_seconds'] for c in group) / len(group):.0f} | "
                + " / ".join(str(c["epochs_run"]) for c in group)
                + " |"
            )
    lines += _default_vs_paper(groups)
    lines += _lower_variant_tables(groups)
    lines.append("\nProcedures (fit_sdm_head keyword arguments):\n")
    seen = {}
    for cell in cells.values():
        seen.setdefault(cell["procedure"], cell["kwargs"])
    for name, kwargs in sorted(seen.items()):
        lines.append(f"* `{name}`: `{json.dumps(kwargs, sort_keys=True)}`")
    lines.append(
        "\nCommands (2 CPU cores, torch threads as set by the environment; other work ran beside the papers' "
        "cells, so their fit times are upper bounds):\n\n"
        "    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/efficiency.py --procedures auto   # the default (~6 min)\n"
        "    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/efficiency.py --procedures paper fast\n"
        "    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/efficiency.py --procedures \\\n"
        '        "fast+feature-norm=procedure:fast,normalization:feature" \\\n'
        '        "fast+selection-split=procedure:fast,selection_fraction:0.25" \\\n'
        '        "fast+M256=procedure:fast,exemplar_dim:256"\n'
        "    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/efficiency.py --procedures \\\n"
        '        "fast+guard=procedure:fast,min_class_points:auto" \\\n'
        '        "fast+feature-norm+guard=procedure:fast,normalization:feature,min_class_points:auto"'
    )
    return "\n".join(lines) + "\n"


def _default_vs_paper(groups) -> list[str]:
    """The library's default procedure ("auto") against the papers' on each feature set and alpha:
    held-out admitted shares, their ratio, the draws' validity and the fit times."""
    lines = [
        "\n## The default (`auto`) against the papers' procedure\n",
        "| features | alpha | paper: admitted | auto: admitted | ratio | auto: draws' worst-class mean acc. | "
        "auto: draws > 2 SE below | fit s paper / auto | fit time ratio |",
        "|" + "---|" * 9,
    ]
    jobs = sorted({job for job, _ in groups})
    rows = 0
    for job in jobs:
        auto, paper = groups.get((job, "auto")), groups.get((job, "paper"))
        if not auto or not paper:
            continue
        for alpha in ALPHAS:
            share = {}
            for name, group in (("auto", auto), ("paper", paper)):
                tests = [c["held_out"][IN_DISTRIBUTION][str(alpha)] for c in group]
                share[name] = sum(t["admitted"] / t["n"] for t in tests) / len(tests)
            worst, below = [], []
            for cell in sorted(auto, key=lambda c: c["split"]):
                v = next(r for r in cell["validity"] if r["alpha"] == alpha and r["estimator"] == "sdm_hr")
                accs = [g["mean_accuracy"] for g in v["per_class"].values() if g["mean_accuracy"] is not None]
                worst.append(f"{min(accs):.3f}" if len(accs) == len(v["per_class"]) else "R")
                below.append(f"{v['share_draws_any_class_below']:.0%}")
            fit = {n: sum(c["fit_seconds"] for c in g) / len(g) for n, g in (("auto", auto), ("paper", paper))}
            ratio = f"{share['auto'] / share['paper']:.1f}x" if share["paper"] else "-"
            lines.append(
                f"| {auto[0]['features']} | {alpha} | {share['paper']:.1%} | {share['auto']:.1%} | {ratio} | "
                f"{', '.join(worst)} | {' / '.join(below)} | {fit['paper']:.0f} / {fit['auto']:.0f} | "
                f"1/{fit['paper'] / max(fit['auto'], 1e-9):.0f} |"
            )
            rows += 1
    return lines if rows else []


def _lower_variant_tables(groups) -> list[str]:
    """The recalibration draws of the HR region and of its lower-bound variant side by side, for
    the cells that recorded both."""
    lines = [
        "\n## Recalibration draws: HR region vs its lower-bound variant (`in_hr_lower`)\n",
        "Mean admitted share of the draws' test parts, worst-class mean accuracy and share of draws "
        "with a class more than 2 SE below alpha, per split.\n",
        "| features | procedure | alpha | HR: admitted | HR: worst-class acc. | HR: draws below | lower: admitted "
        "| lower: worst-class acc. | lower: draws below |",
        "|" + "---|" * 9,
    ]
    rows = 0
    for (_job, procedure), group in sorted(groups.items()):
        group = sorted(group, key=lambda c: c["split"])
        if not all(any(r["estimator"] == "sdm_hr_lower" for r in c["validity"]) for c in group):
            continue
        for alpha in ALPHAS:
            cols = []
            for estimator in ("sdm_hr", "sdm_hr_lower"):
                vs = [
                    next(r for r in c["validity"] if r["alpha"] == alpha and r["estimator"] == estimator) for c in group
                ]
                worst = []
                for v in vs:
                    accs = [g["mean_accuracy"] for g in v["per_class"].values() if g["mean_accuracy"] is not None]
                    worst.append(f"{min(accs):.3f}" if len(accs) == len(v["per_class"]) else "R")
                cols += [
                    " / ".join(f"{v['mean_admitted_share']:.1%}" for v in vs),
                    ", ".join(worst),
                    " / ".join(f"{v['share_draws_any_class_below']:.0%}" for v in vs),
                ]
            lines.append(f"| {group[0]['features']} | {procedure} | {alpha} | " + " | ".join(cols) + " |")
            rows += 1
    return lines if rows else []


if __name__ == "__main__":
    main()
