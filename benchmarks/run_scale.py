"""Scale benchmarks (issue: large support sets): predict throughput, agreement and memory.

    python benchmarks/run_scale.py                       # 10^4 and 10^5, then 10^6 (float16)
    python benchmarks/run_scale.py --sizes 10000 100000  # skip 10^6

Synthetic clustered data (40 Gaussian clusters in 64 dims, labels by cluster parity, 5%
label noise), an SDM head (M = 1000) trained briefly on 4,000 points, whose support is then
the N points (added in chunks of 200,000); 2,000 calibration points; predict on 2,000
batched queries and 50 one-at-a-time queries. For each index (exact flat, IVF, HNSW;
float32 or float16 storage) it reports build time, batched predict time, the time of the
bare FAISS search the prediction contains (one k = 32 search of the same exemplars),
batch-of-one latency, agreement with exact search (q, d, HR) and the process's resident
memory after the build. Results are appended to benchmarks/results/scale.md after every
configuration, so a partial run still leaves numbers.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings
from pathlib import Path

import faiss
import torch

from sdm_hf import SDMConfig, SDMHead, fit_sdm_head

OUT = Path(__file__).resolve().parent / "results" / "scale.md"
DIM = 64


def rss_gb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def data(n: int, seed: int):
    g = torch.Generator().manual_seed(1234)
    centers = torch.randn(40, DIM, generator=g) * 1.5
    g = torch.Generator().manual_seed(seed)
    cluster = torch.randint(0, 40, (n,), generator=g)
    x = centers[cluster] + torch.randn(n, DIM, generator=g)
    y = cluster % 2
    flip = torch.rand(n, generator=g) < 0.05
    return x, torch.where(flip, 1 - y, y)


_TRAINED: dict = {}


def trained_state():
    """Weights of a head trained briefly on 4,000 points, so that its HR region is not empty
    and the HR agreement means something."""
    if not _TRAINED:
        x, y = data(4000, seed=7)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            small = fit_sdm_head(
                x[:2000],
                y[:2000],
                x[2000:],
                y[2000:],
                SDMConfig(input_dim=DIM, exemplar_dim=1000, alpha=0.9),
                epochs=10,
                shuffles=1,
                learning_rate=1e-3,
                resplit=False,
                progress=False,
            )
        _TRAINED.update(small.state_dict())
    return _TRAINED


def head_for(n: int, index_type: str, storage: str, params: dict | None):
    cfg = SDMConfig(
        input_dim=DIM,
        num_classes=2,
        exemplar_dim=1000,
        alpha=0.9,
        index_type=index_type,
        index_params=params,
        support_storage=storage,
    )
    head = SDMHead(cfg)
    head.load_state_dict(trained_state())
    started = time.perf_counter()
    for start in range(0, n, 200_000):  # stream the support in chunks: bounded working set
        x, y = data(min(200_000, n - start), seed=start + 1)
        if start == 0:
            head.build_support(x, y)
        else:
            head.add_to_support(x, y)
    x_cal, y_cal = data(2000, seed=999_999)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        head.calibrate(x_cal, y_cal, store_features=False)
    return head, time.perf_counter() - started


def measure(n: int, index_type: str, storage: str, params: dict | None) -> str:
    head, build = head_for(n, index_type, storage, params)
    memory = rss_gb()
    queries, _ = data(2000, seed=424242)
    started = time.perf_counter()
    out = head.predict(queries)
    predict = time.perf_counter() - started
    exemplars, _ = head._encode_batched(queries, 8192)
    started = time.perf_counter()
    head.support.search(exemplars, 32)
    bare = time.perf_counter() - started
    started = time.perf_counter()
    for i in range(50):
        head.predict(queries[i : i + 1])
    single = (time.perf_counter() - started) / 50
    agreement = head.index_agreement(queries) if not head.support.exact else None
    agree = (
        "exact"
        if agreement is None
        else (f"q {agreement['same_q']:.3f}, d {agreement['same_d']:.3f}, HR {agreement['same_hr']:.3f}")
    )
    name = index_type + (f" {params}" if params else "")
    return (
        f"| {n:,} | {name} | {storage} | {build:.1f} s | {predict:.2f} s ({2000 / predict:,.0f}/s) | "
        f"{bare:.2f} s | {predict / bare:.2f}x | {single * 1000:.1f} ms | {agree} | "
        f"{int(out.in_hr.sum())} | {memory:.2f} GB |"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    args = parser.parse_args(argv)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    header = [
        "# Scale benchmarks",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, faiss {faiss.__version__}; "
        f"{time.strftime('%Y-%m-%d')}. Command: python benchmarks/run_scale.py --sizes "
        + " ".join(map(str, args.sizes)),
        "",
        "| support | index | storage | build | predict 2,000 (batched) | bare search | ratio | batch-of-one "
        "| agreement with exact | HR admitted | RSS after build |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    OUT.write_text("\n".join(header) + "\n")
    configs = []
    for n in args.sizes:
        if n <= 100_000:
            configs += [
                (n, "flat", "float32", None),
                (n, "ivf", "float32", {"nlist": 256, "nprobe": 16}),
                (n, "hnsw", "float32", {"M": 32, "efConstruction": 80, "efSearch": 128}),
            ]
        else:
            configs += [(n, "ivf", "float16", {"nlist": 1024, "nprobe": 16}), (n, "flat", "float16", None)]
    for config in configs:
        line = measure(*config)
        print(line, flush=True)
        with OUT.open("a") as handle:
            handle.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
