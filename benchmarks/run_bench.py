"""`make bench`: the benchmark suite in one command, one markdown table per question.

    python benchmarks/run_bench.py                  # everything, ~25 minutes on 2 cores
    python benchmarks/run_bench.py --sizes 10000 100000   # skip the 10^6 support set
    python benchmarks/run_bench.py --remeasure 1000000 ivf float16 '{"nlist": 2048, "nprobe": 40}'
        # one prediction row again (own process), replacing the row of the same support size,
        # index and storage in bench.json/bench.md, with a dated note saying so

Writes benchmarks/results/bench.md and bench.json (rewritten after every measurement, so an
interrupted run still leaves its numbers), with the machine it ran on:

1. ``fit_sdm_head`` time per epoch at 10^4 and 10^5 support (training) points (synthetic
   clustered data, 64 input dims, M = 1000, 2,000 calibration points, 2 epochs; an exact
   epoch at 10^6 would take hours on 2 cores, so it is not run).
2. Algorithm 1 (q'_min and psi) at 5,000 / 50,000 / 500,000 calibration points.
3. Prediction at 10^4, 10^5 and 10^6 support points for exact / IVF / HNSW indexes (float32,
   and float16 storage at 10^6): build time, batched throughput on 2,000 queries, the bare
   FAISS search inside it, batch-of-one latency, agreement with exact float32 search (q, d,
   HR decision), speed-up over exact float32, resident memory after predict and peak memory.
   Every configuration runs in its own process (``run_scale.py --one``), so the memory
   figures are its own.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run_core import bench_alg1, machine  # noqa: E402
from run_scale import DIM, child_result, data  # noqa: E402

from sdm_hf import SDMConfig, fit_sdm_head  # noqa: E402

RESULTS = HERE / "results"
HNSW = {"M": 32, "efConstruction": 80, "efSearch": 128}


def predict_configs(sizes: list[int]) -> list[tuple]:
    """(support size, index, storage, params) to measure."""
    configs = []
    for n in sizes:
        nlist = 256 if n <= 100_000 else 2048
        nprobe = 16 if n <= 100_000 else 40  # 10^6: the smallest nprobe measured at >= 99% HR agreement
        configs += [
            (n, "flat", "float32", None),
            (n, "ivf", "float32" if n <= 100_000 else "float16", {"nlist": nlist, "nprobe": nprobe}),
            (n, "hnsw", "float32" if n <= 100_000 else "float16", HNSW),
        ]
        if n > 100_000:
            configs.append((n, "flat", "float16", None))
    return configs


def bench_fit(n: int, epochs: int = 2) -> dict:
    x, y = data(n, seed=11)
    x_cal, y_cal = data(2000, seed=12)
    config = SDMConfig(input_dim=DIM, num_classes=2, exemplar_dim=1000, alpha=0.9)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        head = fit_sdm_head(
            x,
            y,
            x_cal,
            y_cal,
            config,
            procedure="paper",
            epochs=epochs,
            shuffles=1,
            resplit=False,
            learning_rate=1e-4,
            progress=True,
        )
    seconds = [h["seconds"] for h in head.training_history]
    return {
        "support": n,
        "epochs": epochs,
        "mean_epoch_seconds": float(np.mean(seconds)),
        "total_seconds": time.perf_counter() - started,
    }


def run_one(config: tuple, timeout: int) -> dict:
    n, index_type, storage, params = config
    command = [sys.executable, str(HERE / "run_scale.py"), "--one", str(n), index_type, storage, json.dumps(params)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"support": n, "index": index_type, "storage": storage, "params": params, "error": "timed out"}
    row = child_result(done)
    if "error" in row:
        return {"support": n, "index": index_type, "storage": storage, "params": params, **row}
    return row


def import_rss_gb() -> float:
    """Resident memory of a fresh process that only imports sdm_hf (the floor under every
    memory figure below), in GiB."""
    code = (
        "import sdm_hf\n"
        "for line in open('/proc/self/status'):\n"
        "    if line.startswith('VmRSS:'): print(line.split()[1])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1]) / 2**20


def _s(value, digits=2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown(results: dict) -> str:
    lines = [
        "# Benchmarks (`make bench`)",
        "",
        f"Machine: {results['machine']}. Date: {results['date']}. Command: `{results['command']}`.",
        "",
        "## fit_sdm_head: time per epoch (synthetic clustered data, 64 dims, M = 1000, 2,000 calibration points)",
        "",
        "| training (= support) points | epochs | mean epoch | total |",
        "|---|---|---|---|",
    ]
    for row in results["fit"]:
        lines.append(
            f"| {row['support']:,} | {row['epochs']} | {row['mean_epoch_seconds']:.2f} s | "
            f"{row['total_seconds']:.1f} s |"
        )
    lines += [
        "",
        "## Algorithm 1 (q'_min and psi, C = 2, alpha = 0.95)",
        "",
        "| calibration points | time |",
        "|---|---|",
    ]
    for row in results["alg1"]:
        lines.append(f"| {row['n']:,} | {row['seconds'] * 1000:.1f} ms |")
    lines += [
        "",
        "## Prediction: 2,000 batched queries and batch-of-one, per support size and index",
        "",
        "Agreement: fraction of the 2,000 queries whose q, d and HR decision equal those of exact float32 "
        "search over the same exemplars. Speed-up: exact float32 batched time / this index's.",
        "",
        "| support | index | storage | build | predict 2,000 | queries/s | bare search | predict / bare | "
        "batch-of-one | same q | same d | same HR | speed-up vs exact | RSS after predict | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["predict"]:
        name = r["index"] + (" " + ", ".join(f"{k}={v}" for k, v in r["params"].items()) if r.get("params") else "")
        if "error" in r:
            lines.append(f"| {r['support']:,} | {name} | {r['storage']} | failed: {r['error'][:80]!r} |")
            continue
        agree = r.get("agreement") or {}
        lines.append(
            f"| {r['support']:,} | {name} | {r['storage']} | {r['build_seconds']:.1f} s | "
            f"{r['predict_seconds']:.2f} s | "
            f"{2000 / r['predict_seconds']:,.0f} | {r['bare_seconds']:.2f} s | "
            f"{r['predict_seconds'] / r['bare_seconds']:.2f}x | {r['single_ms']:.1f} ms | "
            f"{_s(agree.get('same_q'), 3)} | {_s(agree.get('same_d'), 3)} | {_s(agree.get('same_hr'), 4)} | "
            f"{_s(r.get('speedup_vs_exact'), 1)}x | {r['rss_after_predict_gb']:.2f} GiB | {r['peak_rss_gb']:.2f} GiB |"
        )
    served = [r for r in results["predict"] if "loaded" in r and "error" not in r["loaded"]]
    if served:
        lines += [
            "",
            "## Serving: a fresh process loads the saved head (`SDMHead.from_pretrained`) and predicts 2,000 queries",
            "",
            "| support | index | storage | load | predict 2,000 | RSS after load | RSS after predict | peak RSS |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in served:
            s = r["loaded"]
            lines.append(
                f"| {r['support']:,} | {r['index']} | {r['storage']} | {s['load_seconds']:.1f} s | "
                f"{s['predict_seconds']:.2f} s | {s['rss_after_load_gb']:.2f} GiB | "
                f"{s['rss_after_predict_gb']:.2f} GiB | {s['peak_rss_gb']:.2f} GiB |"
            )
    notes = [""]
    if "import_rss_gb" in results:
        notes.append(
            f"Memory is the process's resident set in GiB; a process that only imports sdm_hf (torch and "
            f"FAISS; transformers loads when first used) already holds {results['import_rss_gb']:.2f} GiB "
            "(benchmarks/import_cost.py measures the import itself)."
        )
    if "total_minutes" in results:
        notes.append(f"The whole suite took {results['total_minutes']:.1f} minutes.")
    for note in results.get("notes", []):
        notes += ["", note]
    return "\n".join(lines + notes) + "\n"


def remeasure(config: tuple, timeout: int) -> dict:
    """Measure one prediction configuration again and put it in place of the committed row
    with the same support size, index type and storage (appended when there is none)."""
    path = RESULTS / "bench.json"
    if not path.exists():
        raise SystemExit(f"{path} does not exist yet: run the whole suite first")
    results = json.loads(path.read_text())
    row = run_one(config, timeout)
    if "error" in row:
        raise SystemExit(f"the measurement failed, nothing was changed: {row['error']}")
    key = (row["support"], row["index"], row["storage"])
    rows = results["predict"]
    where = next((i for i, r in enumerate(rows) if (r["support"], r["index"], r["storage"]) == key), None)
    o = None if where is None else rows[where]  # the row being replaced
    if where is None:
        rows.append(row)
    else:
        rows[where] = row
    before = ""
    if o is not None and "predict_seconds" in o:
        before = (
            f" (it was: params {o.get('params')}, predict {o['predict_seconds']:.2f} s, speed-up "
            f"{o.get('speedup_vs_exact') or 0:.1f}x, RSS after predict {o['rss_after_predict_gb']:.2f} GiB)"
        )
    n, index_type, storage, params = config
    results["import_rss_gb"] = import_rss_gb()  # the floor, with the code of that day
    results.setdefault("notes", []).append(
        f"Re-measured on {time.strftime('%Y-%m-%d')}: {n:,} {index_type} {storage} {json.dumps(params)}, "
        f"own process, with the code of that day{before}; the import floor was re-measured with it."
    )
    (RESULTS / "bench.json").write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    (RESULTS / "bench.md").write_text(markdown(results))
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--fit-sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per predict configuration")
    parser.add_argument(
        "--remeasure",
        nargs=4,
        metavar=("N", "INDEX", "STORAGE", "PARAMS_JSON"),
        help="re-measure one prediction configuration and replace its row",
    )
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.remeasure:
        n, index_type, storage, params = args.remeasure
        print(json.dumps(remeasure((int(n), index_type, storage, json.loads(params)), args.timeout)))
        return 0
    results = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/run_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "import_rss_gb": import_rss_gb(),
        "fit": [],
        "alg1": [],
        "predict": [],
    }

    def write():
        (RESULTS / "bench.json").write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
        (RESULTS / "bench.md").write_text(markdown(results))

    started = time.perf_counter()
    for n in args.fit_sizes:
        results["fit"].append(bench_fit(n))
        write()
    results["alg1"] = [{"n": r["n"], "seconds": r["seconds"]} for r in bench_alg1(direct=False)]
    write()
    for config in predict_configs(args.sizes):
        row = run_one(config, args.timeout)
        results["predict"].append(row)
        print(json.dumps(row), flush=True)
        write()
    results["total_minutes"] = (time.perf_counter() - started) / 60
    write()
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
