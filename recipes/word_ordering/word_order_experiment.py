"""The SDM language-model experiment end to end (paper: Schmaltz, SDM language models, Tables 2-3).

    make lm-demo     # = word_order_experiment.py --demo --seeds 0 --overwrite          (one seed)
    make lm-seeds    # = word_order_experiment.py --demo --seeds 0 1 2 --resume         (the seed study)
    python recipes/word_ordering/word_order_experiment.py --out outputs/word_ordering_full --overwrite
    python recipes/word_ordering/word_order_experiment.py --base-model microsoft/Phi-3.5-mini-instruct \\
        --out outputs/wo_phi --epochs 5 --batch-size 8 --learning-rate 1e-5   # on a GPU

Starting from one base model (default: the committed CPU model in ``base_model/``, trained by
``train_base_model.py``), four fine-tuning runs with identical budgets (data, epochs, steps,
learning rate, seed):

* ``FT(CM)``          cross-entropy, contrastive masking, static negatives only;
* ``FT(CM+HN)``       cross-entropy, plus online hard negatives (gamma_gen = 0.5 from epoch 2);
* ``SDM+FT(CM)``      the SDM next-token loss (verification head refreshed every epoch);
* ``SDM+FT(CM+HN)``   the SDM loss plus online hard negatives;

and ``base`` (no fine-tuning) for reference. For each: the test-time heads on the calibration
set (``--final-heads``: ``mixed``, the papers' positives, static negatives and wrong greedy
generations, Sec. 3.4; ``generations``, calibrated on the model's own greedy generations of
held-out calibration prompts), each with risk tiers at ``--alpha`` and ``--extra-alphas`` from
one calibration, then ``pipeline("sdm-verify")`` on every test set: greedy generation, ground
truth ``y = r(positive, generation)`` (exact match of the content), each head's verdict and
HR flags. Verification heads are fitted with ``fit_sdm_head``'s default procedure unless
``--head-procedure`` says otherwise.

Written to ``--out`` for one seed: ``tables.md`` / ``results.json`` (admitted share, HR
accuracy and class-conditional accuracy per head, test set, run and alpha, with Wilson
intervals; marginal sentence and exact-match accuracy; the heads' calibration summaries),
``admitted_vs_alpha.png``, ``command.txt``, and per run its metrics and generations
(``runs/<run>/``). With ``--seeds``: one such folder per seed (``seed_<k>/``) and the paired
comparison over seeds (``comparison.md``, ``comparison.json``, ``admitted_vs_alpha.png``).
``--resume`` keeps finished runs of an earlier call with the same settings; without it an
existing folder is refused (or replaced with ``--overwrite``).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from transformers import pipeline

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

import word_order_data as wod  # noqa: E402
import word_order_models as wom  # noqa: E402
import word_order_report as report  # noqa: E402

from sdm_hf.evaluation.metrics import selective_classification_report, selective_counts  # noqa: E402
from sdm_hf.lm import SDMTrainer, SDMTrainingArguments, exact_match_verifier  # noqa: E402
from sdm_hf.training.fit import PROCEDURES  # noqa: E402
from sdm_hf.utils.output_dir import prepare_output_dir, seal_output_dir, unseal_output_dir  # noqa: E402

RUNS = {
    "base": {"train": False, "use_sdm_loss": False, "hard_negatives": False},
    "FT(CM)": {"train": True, "use_sdm_loss": False, "hard_negatives": False},
    "FT(CM+HN)": {"train": True, "use_sdm_loss": False, "hard_negatives": True},
    "SDM+FT(CM)": {"train": True, "use_sdm_loss": True, "hard_negatives": False},
    "SDM+FT(CM+HN)": {"train": True, "use_sdm_loss": True, "hard_negatives": True},
}
TEST_SETS = ("test", "harvard", "shifted")
TEST_NAMES = {
    "saplma": {"test": "SAPLMA (in-distribution)", "harvard": "Harvard", "shifted": "SAPLMA longest (shifted)"},
    "reviews": {"test": "reviews (in-distribution)", "harvard": "Harvard", "shifted": "reviews longest (shifted)"},
}
# settings that must agree for --resume to reuse a finished run
SETTINGS = (
    "base_model",
    "corpus",
    "prompt",
    "lora_rank",
    "weight_decay",
    "warmup_ratio",
    "gradient_accumulation",
    "evaluations_per_epoch",
    "bf16",
    "max_steps",
    "train_size",
    "calibration_size",
    "test_size",
    "harvard_size",
    "shifted_size",
    "epochs",
    "batch_size",
    "learning_rate",
    "head_procedure",
    "head_epochs",
    "head_exemplar_dim",
    "max_new_tokens",
    "alpha",
    "extra_alphas",
    "final_heads",
    "split_seed",
    "gamma_gen",
    "hard_negatives_from_epoch",
    "seed",
    "select_best",
)
# every setting's default (the CPU experiment over the committed base model); --demo and
# --preset gpu change some of them; anything given on the command line wins over both
DEFAULTS = {
    "base_model": str(HERE / "base_model"),
    "corpus": "saplma",
    "prompt": "short",
    "train_size": 1200,
    "calibration_size": 1000,
    "test_size": 1000,
    "harvard_size": 720,
    "shifted_size": 400,
    "epochs": 8,
    "batch_size": 16,
    "gradient_accumulation": 1,
    "learning_rate": 5e-4,
    "weight_decay": 0.0,
    "warmup_ratio": 0.0,
    "evaluations_per_epoch": 1,
    "select_best": False,
    "head_procedure": "auto",
    "max_new_tokens": 72,
    "generation_batch_size": 64,
    "bf16": False,
    "lora_rank": 0,
    "max_steps": -1,
}
DEMO = {"test_size": 500, "epochs": 5}
PRESETS = {"gpu": wom.GPU_PRESET}
TEMPLATES = {"short": wod.SHORT_PROMPT_TEMPLATE, "paper": wod.PROMPT_TEMPLATE}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-model", help=f"{wom.GEMMA}, or an AutoModelForCausalLM name or path (default: base_model/)")
    p.add_argument("--preset", choices=sorted(PRESETS), help=f"gpu: Gemma 3 270M close to the paper {wom.GPU_PRESET}")
    p.add_argument("--out", type=Path, default=None, help="default: results/ (--demo), results/<model> (--preset)")
    p.add_argument("--demo", action="store_true", help=f"the reduced version of `make lm-demo`: {DEMO}")
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--corpus", choices=wod.CORPORA, help="saplma statements or movie-review sentences")
    p.add_argument("--prompt", choices=sorted(TEMPLATES), help="short (CPU default) or the paper's wording")
    for name in ("train", "calibration", "test", "harvard", "shifted"):
        p.add_argument(f"--{name}-size", type=int, help=f"sentences (default {DEFAULTS[name + '_size']})")
    p.add_argument("--epochs", type=int, help="default 8 (--demo: 5)")
    p.add_argument("--batch-size", type=int, help="per-device training batch (default 16)")
    p.add_argument("--gradient-accumulation", type=int, help="steps per optimizer update (default 1)")
    p.add_argument("--learning-rate", type=float, help="default 5e-4 (the paper: 5e-5 for Phi-3.5)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0; the paper: 0.01)")
    p.add_argument("--warmup-ratio", type=float, help="linear warm-up share of the steps (default 0: 10 steps)")
    p.add_argument("--evaluations-per-epoch", type=int, help="with --select-best; the paper: 2")
    p.add_argument("--select-best", action="store_true", default=None, help="keep the lowest calibration loss")
    p.add_argument(
        "--head-procedure",
        choices=sorted(PROCEDURES),
        help="settings of every verification-head fit: auto (default: fit_sdm_head's default, settings chosen "
        "on held-out training rows), paper (200 epochs at lr 1e-5) or fast (lr 1e-3, early stopping)",
    )
    p.add_argument("--head-epochs", type=int, help="epochs of every verification-head fit (default: the procedure's)")
    p.add_argument("--head-exemplar-dim", type=int, default=1000)
    p.add_argument("--max-new-tokens", type=int, help="default 72")
    p.add_argument("--generation-batch-size", type=int, help="prompts per generate call (default 64)")
    p.add_argument("--bf16", action="store_true", default=None, help="bf16 mixed precision (GPU)")
    p.add_argument("--lora-rank", type=int, help="0 = full fine-tuning (default); > 0: a LoRA adapter")
    p.add_argument("--max-steps", type=int, help="stop each run after this many optimizer steps (smoke tests)")
    p.add_argument("--alpha", type=float, default=0.95, help="the heads' own alpha")
    p.add_argument(
        "--extra-alphas",
        type=float,
        nargs="*",
        default=[0.9, 0.8, 0.7],
        help="risk tiers: the HR region at these alphas too, from the same calibration (SDMConfig.alphas)",
    )
    p.add_argument(
        "--final-heads",
        nargs="+",
        default=["mixed", "generations"],
        choices=["mixed", "generations"],
        help="test-time heads to build and compare: mixed (the papers' calibration rows: positives, static "
        "negatives, wrong generations) and generations (calibrated on the model's own greedy generations of "
        "held-out calibration prompts, labelled by the checker); the first one generates the test sets",
    )
    p.add_argument("--gamma-gen", type=float, default=0.5, help="hard-negative generation rate of the +HN runs")
    p.add_argument("--hard-negatives-from-epoch", type=int, default=1, help="0-based; the paper: the second epoch")
    p.add_argument(
        "--search-depth",
        type=int,
        default=1,
        help="> 1: also run sdm-verify's test-time search (up to N attempts) on the in-distribution test set",
    )
    p.add_argument(
        "--search-alphas",
        type=float,
        nargs="+",
        help="run the search once per alpha, the head recalibrated there (default: --alpha)",
    )
    p.add_argument("--seed", type=int, default=0, help="fine-tuning seed: data order, version draws, head splits")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="a seed study: one run of everything per seed (out/seed_<k>/, each resumable), then the paired "
        "comparison over seeds (out/comparison.md, comparison.json, admitted_vs_alpha.png)",
    )
    p.add_argument(
        "--split-seed",
        type=int,
        default=0,
        help="seed of the data partition (0: the partition the committed base model was trained on; keep it)",
    )
    p.add_argument("--resume", action="store_true", help="reuse finished runs of an earlier call (same settings)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = p.parse_args(argv)
    chosen = {**DEFAULTS, **(DEMO if args.demo else {}), **(PRESETS[args.preset] if args.preset else {})}
    for key, value in chosen.items():  # only what the command line left unset
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.out is None:
        if args.preset:
            args.out = HERE / "results" / wom.model_label(args.base_model)
        else:
            args.out = HERE / "results" / "cpu" if args.demo else HERE.parents[1] / "outputs" / "word_ordering"
    if args.seeds is not None and len(set(args.seeds)) != len(args.seeds):
        p.error("--seeds must not repeat a seed")
    args.final_heads = list(dict.fromkeys(args.final_heads))
    if args.resume and args.overwrite:
        p.error("--resume and --overwrite exclude each other")
    if args.head_epochs is not None and args.head_epochs < 1:
        p.error("--head-epochs must be at least 1")
    for name in ("train_size", "calibration_size", "epochs", "batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("gradient_accumulation", "evaluations_per_epoch", "generation_batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    args.search_alphas = args.search_alphas or [args.alpha]
    if any(not 0.5 < a <= 1.0 for a in [args.alpha, *args.extra_alphas, *args.search_alphas]):
        p.error("every alpha must satisfy 0.5 < alpha <= 1")
    if args.lora_rank < 0 or not 0.0 <= args.warmup_ratio < 1.0:
        p.error("--lora-rank must be >= 0 and --warmup-ratio in [0, 1)")
    return args


def slug(run: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", run).strip("_").lower()


def settings_of(args) -> dict:
    """The settings a resumed folder must share (a seed study's folder: all but the seed)."""
    study = getattr(args, "seeds", None) is not None
    return {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in vars(args).items()
        if k in SETTINGS and not (study and k == "seed")
    }


def prepare_folder(args) -> Path:
    """Create, resume or refuse ``args.out`` (nothing of an earlier run is lost silently, and
    ``--overwrite`` replaces only a folder sdm_hf wrote: one with its marker file)."""
    out = Path(args.out)
    saved = out / "settings.json"
    if out.exists() and any(out.iterdir()):
        if args.overwrite:
            prepare_output_dir(out, overwrite=True, program="word_order_experiment.py")
        elif not args.resume:
            raise FileExistsError(
                f"output folder {out} exists and is not empty; pass --resume to continue it "
                "or --overwrite to replace it"
            )
        elif saved.is_file() and json.loads(saved.read_text(encoding="utf-8")) != settings_of(args):
            raise ValueError(f"{out} was produced with other settings ({saved}); use another --out or --overwrite")
        else:
            unseal_output_dir(out, "word_order_experiment.py")  # files added by the resumed run are ours too
    if not out.exists() or not any(out.iterdir()):
        prepare_output_dir(out, overwrite=False, program="word_order_experiment.py")
    saved.write_text(json.dumps(settings_of(args), indent=2) + "\n", encoding="utf-8")
    return out


def data_splits(args):
    template = TEMPLATES[args.prompt]
    if args.corpus == "reviews":  # sized as asked: whole review pairs per split
        sizes = {"train": args.train_size, "calibration": args.calibration_size, "test": args.test_size}
        splits, summary = wod.build_splits(
            sizes, shifted=args.shifted_size, seed=args.split_seed, template=template, corpus="reviews"
        )
    else:
        sizes = {"sft": 2400, "train": 1200, "calibration": 1000, "test": -1}  # fixed partition (the base model's)
        splits, summary = wod.build_splits(sizes, seed=args.split_seed, template=template)
    take = {
        "train": args.train_size,
        "calibration": args.calibration_size,
        "test": args.test_size,
        "harvard": args.harvard_size,
        "shifted": args.shifted_size,
    }
    for name, n in take.items():
        if n > len(splits[name]):
            raise ValueError(f"--{name}-size {n} exceeds the {len(splits[name])} sentences of the {name} split")
        splits[name] = splits[name].select(range(n))  # splits are already shuffled (seeded)
    summary["used"] = take
    return splits, summary


def trainer_for(run: str, args, out: Path, splits) -> SDMTrainer:
    spec = RUNS[run]
    model, tokenizer = wom.load_base(args.base_model, lora_rank=args.lora_rank)
    cuda = torch.cuda.is_available()
    steps_per_epoch = math.ceil(args.train_size / (args.batch_size * args.gradient_accumulation))
    eval_steps = max(1, steps_per_epoch // args.evaluations_per_epoch)
    train_args = SDMTrainingArguments(
        output_dir=str(out / "runs" / slug(run) / "trainer"),
        use_sdm_loss=spec["use_sdm_loss"],
        gamma_gen=args.gamma_gen if spec["hard_negatives"] else 0.0,
        hard_negatives_from_epoch=args.hard_negatives_from_epoch,
        max_new_tokens=args.max_new_tokens,
        alpha=args.alpha,
        head_procedure=args.head_procedure,
        head_epochs=args.head_epochs,
        head_exemplar_dim=args.head_exemplar_dim,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation,
        per_device_eval_batch_size=args.generation_batch_size,  # also the generation and feature batches
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        lr_scheduler_type="linear",
        warmup_steps=args.warmup_ratio if args.warmup_ratio > 0 else 10,  # a float < 1 is a ratio
        logging_steps=25,
        eval_strategy="steps" if args.select_best else "no",
        eval_steps=eval_steps,
        save_strategy="steps" if args.select_best else "no",
        save_steps=eval_steps,
        save_only_model=True,  # checkpoints for selection only, never resumed: no optimizer state
        save_total_limit=1 if args.select_best else None,
        load_best_model_at_end=args.select_best,
        metric_for_best_model="eval_loss" if args.select_best else None,
        bf16=bool(args.bf16),
        tf32=True if cuda else None,
        report_to=[],
        disable_tqdm=False,
        use_cpu=not cuda,
        seed=args.seed,
    )
    columns = ["prompt", "chosen", "rejected"]
    return SDMTrainer(
        model=model,
        args=train_args,
        train_dataset=splits["train"].select_columns(columns),
        eval_dataset=splits["calibration"].select_columns(columns),
        processing_class=tokenizer,
    )


def _verifier(trainer: SDMTrainer, head):
    """``pipeline("sdm-verify")`` over the trainer's model and tokenizer with ``head``."""
    return pipeline(
        "sdm-verify",
        model=trainer.model,
        tokenizer=trainer.processing_class,
        sdm_head=head,
        device=trainer.model.device,
    )


def alphas_of(args) -> list[float]:
    """The reported alphas, highest first: the heads' own and the risk tiers."""
    return sorted({float(args.alpha), *map(float, args.extra_alphas)}, reverse=True)


def tier_counts(y: torch.Tensor, outputs: list[dict], args) -> dict:
    """Per alpha (key ``repr(alpha)``): :func:`selective_counts` of the head's verdicts admitted by
    that tier's HR region (marginal, per true class, per verdict)."""
    verified = torch.tensor([o["verified"] for o in outputs]).long()
    counts = {}
    for alpha in alphas_of(args):
        key = repr(alpha)
        admitted = torch.tensor([bool(o.get("high_reliability_at", {}).get(key, False)) for o in outputs])
        if alpha == float(args.alpha) and "high_reliability_at" not in (outputs[0] if outputs else {}):
            admitted = torch.tensor([o["high_reliability"] for o in outputs])
        counts[key] = selective_counts(y, verified, admitted, 2, {0: "No", 1: "Yes"})
    return counts


def verify_test_set(trainer: SDMTrainer, heads: dict, dataset, args) -> tuple[dict, list[dict]]:
    """Greedy generation + verification with ``pipeline("sdm-verify")`` on one test set: the
    first of ``heads`` (kind -> head, each with its risk tiers) generates and verifies; the
    others verify the same generations (no new generation)."""
    control = trainer.control_tokens
    built = list(heads)
    verifier = _verifier(trainer, heads[built[0]])
    started = time.perf_counter()
    outputs = verifier(
        list(dataset["prompt"]), batch_size=args.generation_batch_size, max_new_tokens=args.max_new_tokens
    )
    seconds = time.perf_counter() - started
    golds = [c[-1]["content"] for c in dataset["chosen"]]
    generations = [o["generated_text"] for o in outputs]
    y = torch.tensor(
        [exact_match_verifier(control.remove_suffix(g), control.remove_suffix(s)) for g, s in zip(golds, generations)]
    ).long()
    verified = torch.tensor([o["verified"] for o in outputs]).long()
    admitted = torch.tensor([o["high_reliability"] for o in outputs])
    said = torch.tensor([o["model_said"] is True for o in outputs]).long()
    report = selective_classification_report(
        y,
        {
            "SDM HR region": (verified, admitted),
            "SDM head, no rejection": (verified, torch.ones_like(admitted)),
            "LM's own <verified> text": (said, torch.ones_like(admitted)),
        },
        2,
        {0: "No", 1: "Yes"},
    )
    sentence_correct, exact = wod.score_generations(generations, dataset)
    n = len(generations)
    by_kind = {built[0]: outputs}
    pairs = [{"prompt": p, "completion": g} for p, g in zip(dataset["prompt"], generations)]
    for kind in built[1:]:  # the same generations, verified by another head
        by_kind[kind] = _verifier(trainer, heads[kind])(pairs, batch_size=args.generation_batch_size)
    nothing = {"verified": False, "high_reliability": False, "high_reliability_at": {}}
    missing = [kind for kind in args.final_heads if kind not in heads]  # a head that could not be built
    by_kind.update({kind: [nothing] * n for kind in missing})  # admits nothing
    kinds = list(args.final_heads)  # every requested head, built or not
    metrics = {
        "n": n,
        "sentence_accuracy": sum(sentence_correct) / n,
        "exact_match_accuracy": sum(exact) / n,
        "content_correct_rate": float(y.float().mean()),
        "ood": sum(o["is_ood"] for o in outputs),
        "generate_and_verify_seconds": seconds,
        "report": report.to_dict(),
        "tiers": {kind: tier_counts(y, by_kind[kind], args) for kind in kinds},
        "head_accuracy_no_rejection": {
            kind: None
            if kind in missing
            else sum(int(o["verified"]) == int(t) for o, t in zip(by_kind[kind], y.tolist())) / n
            for kind in kinds
        },
    }
    records = [
        {
            "sentence": s,
            "generation": g,
            "y": int(label),
            "model_said": o["model_said"],
            "heads": {
                kind: None
                if kind in missing
                else {
                    "verified": by_kind[kind][i]["verified"],
                    "probability": by_kind[kind][i]["probability"],
                    "high_reliability": by_kind[kind][i]["high_reliability"],
                    "high_reliability_at": by_kind[kind][i].get("high_reliability_at"),
                    "q": by_kind[kind][i]["q"],
                    "d": by_kind[kind][i]["d"],
                }
                for kind in kinds
            },
        }
        for i, (s, g, label, o) in enumerate(zip(dataset["sentence"], generations, y.tolist(), outputs))
    ]
    return metrics, records


def final_heads(trainer: SDMTrainer, args) -> tuple[dict, dict]:
    """The test-time heads of ``args.final_heads`` (one greedy generation pass over the
    calibration prompts serves all), each with the risk tiers ``args.extra_alphas``, and their
    calibration summaries."""
    heads, summaries, generations = {}, {}, None
    for kind in args.final_heads:
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # an empty HR region is reported in the tables
            try:
                head = trainer.build_final_head(generate=True, calibration=kind, generations=generations)
            except ValueError as error:  # e.g. too few right or wrong own generations to calibrate on
                if not heads and kind == args.final_heads[-1]:
                    raise
                summaries[kind] = {"unavailable": str(error), "seconds": time.perf_counter() - started}
                print(f"no {kind} head: {error} (it admits nothing in the tables)")
                continue
            finally:  # the next head reuses this pass's greedy generations
                generations = trainer.epochs.final_head_generations
            head.config = replace(head.config, alphas=[a for a in args.extra_alphas if a != args.alpha] or None)
        rows = head.calibration_report(alphas=alphas_of(args)).rows
        heads[kind] = head
        summaries[kind] = {
            "q_min": head.q_min if math.isfinite(head.q_min) else None,
            "psi": [v if math.isfinite(v) else None for v in head.thresholds.tolist()],
            "calibration_points": sum(r["n"] for r in rows if r["alpha"] == args.alpha),
            "calibration_hr_admitted_at": {
                repr(a): sum(r["admitted"] for r in rows if r["alpha"] == a) for a in alphas_of(args)
            },
            "calibration_yes": int(head.calibration_arrays["labels"].sum()),
            "generated_negatives": trainer.epochs.final_head_generated_negatives,
            "support_points": int(head.support.labels.numel()),
            "procedure": (head.selection or {}).get("procedure"),
            "seconds": time.perf_counter() - started,
        }
    return heads, summaries


def search_test_set(trainer: SDMTrainer, head, dataset, args) -> dict:
    """``pipeline("sdm-verify")`` with test-time search: greedy first, then up to ``search_depth - 1``
    sampled attempts for the prompts not verified in the HR region. Per n = 1..N: the share of
    prompts with an HR-verified attempt among their first n, and the share of those whose
    accepted generation is correct (exact match)."""
    verifier = _verifier(trainer, head)
    control = trainer.control_tokens
    started = time.perf_counter()
    outputs = verifier(
        list(dataset["prompt"]),
        batch_size=args.generation_batch_size,
        max_new_tokens=args.max_new_tokens,
        search_depth=args.search_depth,
        search_kwargs={"seed": args.seed},
    )
    seconds = time.perf_counter() - started
    golds = [c[-1]["content"] for c in dataset["chosen"]]
    depth = args.search_depth
    first = torch.full((len(outputs),), depth, dtype=torch.long)  # index of the first HR-verified attempt
    made, said_yes, in_region = ([0] * depth for _ in range(3))  # per attempt index k, over the prompts
    for i, o in enumerate(outputs):  # per prompt: its attempts list (a handful of dicts)
        attempts = o.get("attempts") or [o]
        hits = [k for k, a in enumerate(attempts) if a["verified"] and a["high_reliability"]]
        if hits:
            first[i] = hits[0]
        for k, a in enumerate(attempts):
            made[k] += 1
            said_yes[k] += bool(a["verified"])
            in_region[k] += bool(a["high_reliability"])
    correct = torch.tensor(
        [
            exact_match_verifier(control.remove_suffix(g), control.remove_suffix(o["generated_text"]))
            for g, o in zip(golds, outputs)
        ]
    ).bool()
    verified_after, correct_after = [], []
    for n in range(1, depth + 1):
        found = first < n
        verified_after.append(float(found.float().mean()))
        correct_after.append(float(correct[found].float().mean()) if found.any() else None)
    return {
        "depth": depth,
        "n": len(outputs),
        "verified_after": verified_after,
        "accuracy_of_verified_after": correct_after,
        "attempts_made": int(sum(len(o.get("attempts") or [o]) for o in outputs)),
        # attempt k (0: greedy): how many were made, judged "Yes" by the head, inside the HR region
        "per_attempt": {"made": made, "head_yes": said_yes, "in_hr_region": in_region},
        "seconds": seconds,
    }


def run_one(run: str, args, out: Path, splits) -> dict:
    folder = out / "runs" / slug(run)
    done = folder / "metrics.json"
    if done.is_file():
        print(f"[{run}] finished earlier: {done}")
        return json.loads(done.read_text(encoding="utf-8"))
    if folder.exists():
        shutil.rmtree(folder)  # an interrupted run starts again
    folder.mkdir(parents=True)
    started = time.perf_counter()
    wom.reset_peak_memory()
    trainer = trainer_for(run, args, out, splits)
    train_seconds = 0.0
    if RUNS[run]["train"]:
        result = trainer.train()
        train_seconds = float(result.metrics["train_runtime"])
    heads, summaries = final_heads(trainer, args)
    head = heads[args.final_heads[0]]
    log = trainer.epoch_log
    metrics = {
        "run": run,
        "seed": args.seed,
        "train_runtime_seconds": train_seconds,
        "seconds": {
            "train (incl. refreshes and evaluations)": train_seconds,
            "hard-negative generation": sum(e.get("generation_seconds", 0.0) for e in log),
            "head refresh (features + fit)": sum(
                e.get("head_features_seconds", 0.0) + e.get("head_fit_seconds", 0.0) for e in log
            ),
            "final heads (generation + fits)": sum(h["seconds"] for h in summaries.values()),
        },
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "best_eval_loss": trainer.state.best_metric,
        "evaluations": [
            {"step": e["step"], "eval_loss": e["eval_loss"]} for e in trainer.state.log_history if "eval_loss" in e
        ],
        "epoch_log": log,
        "final_heads": summaries,
        "test": {},
    }
    for name in TEST_SETS:
        metrics["test"][name], records = verify_test_set(trainer, heads, splits[name], args)
        with (folder / f"generations_{name}.jsonl").open("w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, allow_nan=False) + "\n")
    metrics["seconds"]["test generation + verification"] = sum(
        t["generate_and_verify_seconds"] for t in metrics["test"].values()
    )
    if args.search_depth > 1:
        metrics["search"] = []
        for alpha in args.search_alphas:  # the same head, Algorithm 1 rerun at each alpha
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                head.recalibrate(alpha=alpha)
            entry = search_test_set(trainer, head, splits["test"], args)
            rows = head.calibration_report(alphas=()).rows
            entry.update(alpha=alpha, calibration_admitted=sum(r["admitted"] for r in rows))
            metrics["search"].append(entry)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            head.recalibrate(alpha=args.alpha)
    metrics["peak_gpu_memory_gib"] = wom.peak_memory_gib()
    metrics["device"] = wom.device_facts()
    metrics["total_seconds"] = time.perf_counter() - started
    shutil.rmtree(folder / "trainer", ignore_errors=True)
    done.write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    print(f"[{run}] done in {metrics['total_seconds']:.0f} s")
    return metrics


def header_lines(args, title: str) -> list[str]:
    """The settings line every table starts with."""
    tuning = f"LoRA r={args.lora_rank}" if args.lora_rank else "full fine-tuning"
    procedure = args.head_procedure
    epochs = args.head_epochs or PROCEDURES[procedure]["epochs"]
    return [
        f"# {title}",
        "",
        f"Base model `{wom.model_label(args.base_model)}` ({tuning}); {args.corpus} sentences, "
        f"train {args.train_size}, calibration {args.calibration_size}; {args.epochs} epochs, batch "
        f"{args.batch_size} x {args.gradient_accumulation}, lr {args.learning_rate}; verification heads: "
        f"fit_sdm_head procedure '{procedure}'{' (the default)' if procedure == 'auto' else ''}, at most {epochs} "
        f"epochs, M = {args.head_exemplar_dim}; alpha = {args.alpha}, risk tiers "
        f"{', '.join(map(str, args.extra_alphas)) or 'none'}; device {wom.device_facts()['name']}. "
        "y = r(positive, generation) (exact match of the sentence content).",
    ]


def plot_search(results: dict, out: Path) -> None:
    """search.png: the share of test prompts verified within n attempts, per run and alpha."""
    searched = [(run, search) for run, m in results.items() for search in m.get("search") or []]
    if not searched:
        return
    from sdm_hf.evaluation.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for run, search in searched:
        steps = range(1, search["depth"] + 1)
        ax.plot(steps, search["verified_after"], marker="o", label=f"{run}, alpha = {search['alpha']}")
        for n, share, acc in zip(steps, search["verified_after"], search["accuracy_of_verified_after"]):
            ax.annotate(report.fmt(acc, 2), (n, share), fontsize=7, va="bottom")
    ax.set_xlabel("attempts (1 = greedy only)")
    ax.set_ylabel("share of test prompts verified in the HR region")
    ax.set_title("Test-time search (label: accuracy of the verified)")
    ax.set_xticks(list(range(1, max(s["depth"] for _, s in searched) + 1)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "search.png", dpi=120)
    plt.close(fig)


def search_text(results: dict) -> str:
    text = ""
    for run, m in results.items():
        for search in m.get("search") or []:
            shares = ", ".join(f"{n + 1}: {v:.1%}" for n, v in enumerate(search["verified_after"]))
            text += (
                f"\nTest-time search ({run}, alpha = {search['alpha']}: {search['calibration_admitted']} calibration "
                f"points in the HR region; {search['n']} test prompts, {search['attempts_made']} attempts, "
                f"{search['seconds']:.0f} s): verified in the HR region after n attempts: {shares}; accuracy of "
                f"the verified: {', '.join(report.fmt(a) for a in search['accuracy_of_verified_after'])}. "
                "See search.png.\n"
            )
            per = search["per_attempt"]
            text += (
                "Per attempt (1 = greedy): made / head says Yes / in the HR region: "
                + "; ".join(
                    f"{k + 1}: {m} / {y} / {h}"
                    for k, (m, y, h) in enumerate(zip(per["made"], per["head_yes"], per["in_hr_region"]))
                )
                + ".\n"
            )
    return text


def command_line(argv) -> str:
    return "python recipes/word_ordering/word_order_experiment.py " + " ".join(sys.argv[1:] if argv is None else argv)


def run_seed(args, command: str) -> tuple[dict, str]:
    """Every run of ``args.runs`` at ``args.seed`` into ``args.out`` (resumable); its tables,
    figure and results.json. Returns ``(run -> metrics, tables markdown)``."""
    out = prepare_folder(args)
    (out / "command.txt").write_text(command + "\n", encoding="utf-8")
    torch.manual_seed(args.seed)
    splits, summary = data_splits(args)
    (out / "data_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    results = {run: run_one(run, args, out, splits) for run in args.runs}
    names = TEST_NAMES[args.corpus]
    footer = [
        f"Data: {json.dumps(summary['used'])}; skipped lines: {json.dumps(summary['skipped'])}.",
        "",
        f"Command: `{command}`",
        "",
    ]
    title = f"Word ordering: SDM fine-tuning vs standard fine-tuning (seed {args.seed})"
    text = report.seed_tables(results, header_lines(args, title), names, footer) + search_text(results)
    (out / "tables.md").write_text(text, encoding="utf-8")
    (out / "results.json").write_text(
        json.dumps(
            {
                "command": command,
                "device": wom.device_facts(),
                "settings": settings_of(args),
                "data": summary,
                "runs": results,
            },
            indent=2,
            allow_nan=False,
        )
        + "\n",
        encoding="utf-8",
    )
    one = report.study_summary({args.seed: results})
    report.plot_admitted_vs_alpha(one, out / "admitted_vs_alpha.png", names, f"HR region vs alpha (seed {args.seed})")
    plot_search(results, out)
    seal_output_dir(out, "word_order_experiment.py")  # a later --overwrite refuses files added by hand
    return results, text


def run_study(args, command: str) -> str:
    """A seed study: :func:`run_seed` for every seed of ``args.seeds`` into ``out/seed_<k>/`` (each
    resumable), then the paired comparison over seeds in ``out``."""
    root = prepare_folder(args)
    per_seed = {}
    for seed in args.seeds:
        one = argparse.Namespace(**vars(args))
        one.seed, one.seeds, one.out = seed, None, root / f"seed_{seed}"
        one.resume, one.overwrite = True, False  # the study folder was prepared (or replaced) above
        per_seed[seed], _ = run_seed(one, command)
        print(f"seed {seed} done")
    names = TEST_NAMES[args.corpus]
    footer = ["", f"Command: `{command}`", ""]
    title = "Word ordering: SDM fine-tuning vs standard fine-tuning, paired over seeds"
    text = report.write_study(root, per_seed, names, header_lines(args, title), footer)
    (root / "command.txt").write_text(command + "\n", encoding="utf-8")
    seal_output_dir(root, "word_order_experiment.py")
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    command = command_line(argv)
    started = time.perf_counter()
    if args.seeds is None:
        _, text = run_seed(args, command)
    else:
        text = run_study(args, command)
    print(text)
    print(f"wrote {args.out} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
