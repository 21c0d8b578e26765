"""SDMTrainer on one process vs two (torchrun, gloo) over the same global batch, on CPU.

    python benchmarks/lm_processes.py        # writes benchmarks/results/lm_processes.{md,json}

The setting of benchmarks/run_lm.py (a 4-layer 256-wide Llama-style LM built from a config,
2,000 paired examples from the SAPLMA statements, the head at its defaults: M = 1000, 200
epochs), one epoch of the SDM loss without and with online hard negatives (gamma_gen = 0.5
from epoch 0), run twice: one process with 2 threads and batch 16, and two processes
(``torchrun --nproc_per_node 2``) with 1 thread and batch 8 each, so the global batch and
hence every optimizer step are the same. Reported: the Trainer's train_runtime, the whole
run (construction, i.e. tokenization and the epoch-0 head refresh, included), the logged
training loss and the refresh's parts (feature pass, head fit, generation).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "recipes"))

RUNS = {
    "sdm": {"gamma_gen": 0.0},
    "sdm+hard-negatives": {"gamma_gen": 0.5, "hard_negatives_from_epoch": 0, "max_new_tokens": 24},
}
GLOBAL_BATCH = 16


def worker(name: str, out: Path) -> None:
    """One run in this process (a torchrun worker or a single process); rank 0 writes."""
    from run_lm import data, model_for

    from sdm_hf.lm import SDMTrainer, SDMTrainingArguments
    from sdm_hf.utils.distributed import process_world
    from tests.helpers import tiny_tokenizer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    tokenizer = tiny_tokenizer()
    args = SDMTrainingArguments(
        output_dir=f"/tmp/sdm_lm_processes/{name}-{world}",
        num_train_epochs=1,
        per_device_train_batch_size=GLOBAL_BATCH // world,
        per_device_eval_batch_size=32,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=10,
        seed=0,
        ddp_backend="gloo" if world > 1 else None,
        **RUNS[name],
    )
    started = time.perf_counter()
    trainer = SDMTrainer(model=model_for(tokenizer), args=args, train_dataset=data(), processing_class=tokenizer)
    out_metrics = trainer.train()
    total = time.perf_counter() - started
    rank, size = process_world(trainer.accelerator)
    if rank == 0:
        epoch0 = trainer.epoch_log[0]
        record = {
            "run": name,
            "processes": size,
            "threads_per_process": torch.get_num_threads(),
            "per_device_batch": GLOBAL_BATCH // world,
            "train_runtime": out_metrics.metrics["train_runtime"],
            "total_seconds": total,
            "train_loss": out_metrics.metrics["train_loss"],
            "step_losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
            "head_features_seconds": epoch0["head_features_seconds"],
            "head_fit_seconds": epoch0["head_fit_seconds"],
            "generation_seconds": epoch0["generation_seconds"],
            "generated": epoch0["generated"],
        }
        out.write_text(json.dumps(record))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's threads can abort interpreter finalization (tests/lm/distributed_worker.py)


def launch(name: str, processes: int, folder: Path) -> dict:
    out = folder / f"{name}-{processes}.json"
    threads = str(2 // processes)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": threads, "PYTHONPATH": str(ROOT)}
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [sys.executable, *launcher, str(Path(__file__).resolve()), "--worker", name, "--out", str(out)]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())


def main() -> int:
    from run_core import machine

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=sorted(RUNS))
    parser.add_argument("--out", type=Path)
    options = parser.parse_args()
    if options.worker:
        worker(options.worker, options.out)
        return 0
    folder = Path("/tmp/sdm_lm_processes")
    folder.mkdir(parents=True, exist_ok=True)
    results = [launch(name, processes, folder) for name in RUNS for processes in (1, 2)]
    lines = [
        "# SDMTrainer: 1 process vs 2 (torchrun, gloo), same global batch (1 epoch, CPU)",
        "",
        f"{machine()}. The setting of benchmarks/run_lm.py (4-layer 256-wide Llama-style LM, 2,000 paired "
        f"examples, head at defaults); global batch {GLOBAL_BATCH}: 1 process x 2 threads x batch 16, or "
        "2 processes x 1 thread x batch 8.",
        "",
        "| run | processes | train_runtime | total (incl. tokenization + epoch-0 refresh) | train loss | "
        "refresh: features | head fit | generation | generated |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['run']} | {r['processes']} | {r['train_runtime']:.1f} s | {r['total_seconds']:.1f} s | "
            f"{r['train_loss']:.4f} | {r['head_features_seconds']:.1f} s | {r['head_fit_seconds']:.1f} s | "
            f"{r['generation_seconds']:.1f} s | {r['generated']} |"
        )
    for name in RUNS:
        one, two = (r for r in results if r["run"] == name)
        gap = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(one["step_losses"], two["step_losses"]))
        lines.append("")
        lines.append(
            f"{name}: logged losses every 10 steps agree to {gap:.1e} relative ({len(one['step_losses'])} points); "
            f"2 processes take {two['total_seconds'] / one['total_seconds']:.2f}x the time of one."
        )
    lines += [
        "",
        "The head is fitted on the main process only (the others wait for it); the feature pass and "
        "the generation are shared. Two processes on two cores compete with each other's threads, so "
        "this measures correctness and overhead, not the speed-up of two GPUs.",
        "",
        "The `train loss` column is the Trainer's own summary: it adds the loss of the steps after the last "
        "logging step (here 5 of 125) as the main process sees it, without gathering it from the others "
        "(transformers' `_inner_training_loop`), hence its 0.5% gap; the losses the Trainer logs every 10 "
        "steps are gathered over the processes, and those agree.",
    ]
    out = ROOT / "benchmarks" / "results"
    (out / "lm_processes.md").write_text("\n".join(lines) + "\n")
    (out / "lm_processes.json").write_text(json.dumps(results, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
