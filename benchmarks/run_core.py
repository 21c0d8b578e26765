"""Core benchmarks of the SDM estimator (issue: SDM estimator core). Not part of the tests.

    python benchmarks/run_core.py                 # everything (about 15 minutes on 2 cores)
    python benchmarks/run_core.py --only fit --shuffles 2

Writes benchmarks/results/core.md (markdown) and core.json, with the machine description.
Sections:
* fit: fit_sdm_head on the SAPLMA attribute features with the paper's settings
  (M = 1000, batch 50, lr 1e-5, E = 200, J = 10, alpha = 0.95): time per epoch and in
  total, peak resident memory, and the selected head's calibration summary.
* alg1: Algorithm 1 at N = 5k, 50k, 500k calibration points, against a direct (quadratic)
  transcription of the definition at 5k and 50k (same outputs checked), extrapolated to 500k.
* q: q over a 100k x 1000 support for 2,000 queries, adaptive widening vs a fixed
  k = 2048 search (time ratio; outputs checked equal).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "recipes"))

from sdm_hf import SDMConfig, fit_sdm_head  # noqa: E402
from sdm_hf.maths.calibration import high_reliability_thresholds  # noqa: E402
from sdm_hf.maths.similarity import compute_similarity, similarity_from_neighbors  # noqa: E402
from sdm_hf.search.index import SupportIndex  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def machine() -> str:
    import faiss

    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, Python "
        f"{platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"faiss {faiss.__version__}"
    )


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def bench_fit(shuffles: int, epochs: int) -> dict:
    import saplma_data

    x_tr, y_tr = saplma_data.as_arrays(saplma_data.load_topics(saplma_data.TRAIN_TOPICS))
    x_ca, y_ca = saplma_data.as_arrays(saplma_data.load_topics(saplma_data.CALIBRATION_TOPICS))
    config = SDMConfig(input_dim=32, num_classes=2, exemplar_dim=1000, alpha=0.95, id2label=saplma_data.ID2LABEL)
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        head = fit_sdm_head(
            x_tr,
            y_tr,
            x_ca,
            y_ca,
            config,
            procedure="paper",
            epochs=epochs,
            shuffles=shuffles,
            batch_size=50,
            learning_rate=1e-5,
            seed=0,
            progress=True,
        )
    total = time.perf_counter() - started
    epoch_seconds = [h["seconds"] for h in head.training_history]
    report = head.calibration_report(alphas=(0.90, 0.94, 0.95))
    admitted = {}
    for alpha in (0.90, 0.94, 0.95):
        rows = [r for r in report.rows if r["alpha"] == alpha]
        admitted[alpha] = sum(r["admitted"] for r in rows) / sum(r["n"] for r in rows)
    return {
        "shuffles": shuffles,
        "epochs": epochs,
        "total_seconds": total,
        "mean_epoch_seconds": float(np.mean(epoch_seconds)),
        "median_epoch_seconds": float(np.median(epoch_seconds)),
        "peak_rss_gb": peak_rss_gb(),
        "selected": {k: head.selection[k] for k in ("shuffle", "epoch", "calibration_loss")},
        "q_min": head.q_min if math.isfinite(head.q_min) else None,
        "psi": head.thresholds.tolist(),
        "calibration_admission": admitted,
        "report": report.to_markdown(),
        "warnings": [str(w.message) for w in caught],
    }


def direct_algorithm_1(p, r, y, num_classes, alpha):
    """The definition, candidate by candidate (quadratic), vectorised per candidate with numpy."""
    keep = np.floor(r) > 0
    p, r, y = p[keep], r[keep], y[keep]
    for t in np.unique(r):
        psi = []
        for c in range(num_classes):
            s = np.sort(p[(y == c) & (r >= t)])
            psi.append(0.0 if s.size == 0 else s[min(int((1 - alpha) * s.size), s.size - 1)])
        if all(np.float32(v) >= np.float32(alpha) for v in psi):
            return float(t), [float(np.float32(v)) for v in psi]
    return math.inf, [0.0] * num_classes


def alg1_case(n, seed=0):
    """Calibration arrays where probability grows with q', so q'_min lies mid-range and the
    direct loop has to walk about half of the candidates."""
    g = np.random.default_rng(seed)
    y = g.integers(0, 2, n)
    r = g.uniform(0, 100, n).astype(np.float32)
    p = np.clip(0.80 + 0.2 * r / 100 + g.normal(0, 0.04, n), 0, 1).astype(np.float32)
    return p, r, y


def bench_alg1(direct: bool = True) -> list[dict]:
    rows = []
    for n in (5_000, 50_000, 500_000):
        p, r, y = alg1_case(n)
        started = time.perf_counter()
        q_min, psi = high_reliability_thresholds(torch.from_numpy(p), torch.from_numpy(r), torch.from_numpy(y), 2, 0.95)
        fast = time.perf_counter() - started
        row = {"n": n, "seconds": fast, "q_min": q_min, "psi": psi.tolist()}
        if direct and n <= 50_000:
            started = time.perf_counter()
            ref_q_min, ref_psi = direct_algorithm_1(p.astype(np.float64), r.astype(np.float64), y, 2, 0.95)
            row["direct_seconds"] = time.perf_counter() - started
            row["same_output"] = ref_q_min == q_min and ref_psi == psi.tolist()
        rows.append(row)
    if direct:  # the direct definition is quadratic: extrapolate from 50k to 500k
        rows[2]["direct_seconds_extrapolated"] = rows[1]["direct_seconds"] * 100
    return rows


def bench_q(n_support=100_000, dim=1000, n_queries=2000, max_q=2048) -> dict:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(20, dim, generator=g) * 0.6
    cluster = torch.randint(0, 20, (n_support + n_queries,), generator=g)
    vectors = centers[cluster] + torch.randn(n_support + n_queries, dim, generator=g) * 0.5
    labels = cluster % 2
    wrong = torch.rand(n_support + n_queries, generator=g) < 0.05
    preds = torch.where(wrong, 1 - labels, labels)
    support, queries = vectors[:n_support], vectors[n_support:]
    index = SupportIndex(support, labels[:n_support], preds[:n_support])
    q_pred = preds[n_support:]
    started = time.perf_counter()
    adaptive = compute_similarity(index, queries, q_pred, index.labels, index.predictions, max_q=max_q)
    t_adaptive = time.perf_counter() - started
    started = time.perf_counter()
    _, rows = index.search(queries, max_q)
    fixed_q, fixed_nearest, _ = similarity_from_neighbors(rows, q_pred, index.labels, index.predictions, max_q=max_q)
    t_fixed = time.perf_counter() - started
    started = time.perf_counter()
    index.search(queries, 1)
    t_k1 = time.perf_counter() - started
    return {
        "support": n_support,
        "dim": dim,
        "queries": n_queries,
        "adaptive_seconds": t_adaptive,
        "fixed_2048_seconds": t_fixed,
        "k1_search_seconds": t_k1,
        "same_q": bool(torch.equal(adaptive.q, fixed_q)),
        "same_nearest": bool(torch.equal(adaptive.nearest_index, fixed_nearest)),
        "mean_q": float(adaptive.q.float().mean()),
        "max_searched_k": int(adaptive.searched_k.max()),
        "rows_widened": float((adaptive.searched_k > 32).float().mean()),
    }


def to_markdown(results: dict) -> str:
    out = ["# Core benchmarks", "", f"Machine: {results['machine']}", f"Date: {results['date']}", ""]
    if "fit" in results:
        f = results["fit"]
        out += [
            f"## fit_sdm_head on SAPLMA attributes (J = {f['shuffles']}, E = {f['epochs']}, M = 1000, batch 50, "
            "lr 1e-5, alpha = 0.95)",
            "",
            "| total | mean / median per epoch | peak RSS | kept (shuffle, epoch) | q'_min | psi |",
            "|---|---|---|---|---|---|",
            f"| {f['total_seconds']:.0f} s | {f['mean_epoch_seconds'] * 1000:.0f} / "
            f"{f['median_epoch_seconds'] * 1000:.0f} ms | {f['peak_rss_gb']:.2f} GB | "
            f"({f['selected']['shuffle']}, {f['selected']['epoch']}) | {f['q_min']} | "
            f"{[round(v, 4) for v in f['psi']]} |",
            "",
            "Calibration admission rate (in-sample): "
            + ", ".join(f"alpha {a}: {v:.1%}" for a, v in f["calibration_admission"].items()),
            "",
            f["report"],
            "",
        ]
    if "alg1" in results:
        out += ["## Algorithm 1", "", "| N | O(N log N) | direct definition | same output |", "|---|---|---|---|"]
        for r in results["alg1"]:
            direct = (
                f"{r['direct_seconds']:.2f} s"
                if "direct_seconds" in r
                else f"~{r['direct_seconds_extrapolated']:.0f} s (extrapolated, quadratic)"
            )
            out.append(f"| {r['n']:,} | {r['seconds'] * 1000:.1f} ms | {direct} | {r.get('same_output', '-')} |")
        out.append("")
    if "q" in results:
        r = results["q"]
        out += [
            f"## q over a {r['support']:,} x {r['dim']} support ({r['queries']:,} queries, exact FAISS flat)",
            "",
            "| adaptive widening | fixed k = 2048 | ratio | bare k = 1 search | same q / nearest | mean q "
            "| rows widened |",
            "|---|---|---|---|---|---|---|",
            f"| {r['adaptive_seconds']:.2f} s | {r['fixed_2048_seconds']:.2f} s | "
            f"{r['fixed_2048_seconds'] / r['adaptive_seconds']:.2f}x | {r['k1_search_seconds']:.2f} s | "
            f"{r['same_q']} / {r['same_nearest']} | {r['mean_q']:.1f} | {r['rows_widened']:.1%} |",
            "",
        ]
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("fit", "alg1", "q"), action="append")
    parser.add_argument("--shuffles", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--out", default=str(RESULTS / "core"))
    args = parser.parse_args(argv)
    sections = args.only or ["fit", "alg1", "q"]
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d")}
    if "fit" in sections:
        results["fit"] = bench_fit(args.shuffles, args.epochs)
    if "alg1" in sections:
        results["alg1"] = bench_alg1()
    if "q" in sections:
        results["q"] = bench_q()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2, default=lambda v: None))
    out.with_suffix(".md").write_text(to_markdown(results))
    print(to_markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
