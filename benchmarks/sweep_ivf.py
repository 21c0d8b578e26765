"""Approximate-index sweeps at a large support: HR agreement with exact search vs speed.

    python benchmarks/sweep_ivf.py --size 1000000 --nlist 1024 --nprobe 16 32 64 128
    python benchmarks/sweep_ivf.py --index hnsw --size 1000000 --ef-search 128 256 512

Same synthetic data and head as run_scale.py. The index is built once; the exact float32
reference is computed once; each value of the search parameter (IVF ``nprobe``, HNSW
``efSearch``) only reruns the prediction. Appends a table to benchmarks/results/scale.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

try:
    from run_scale import OUT, data, head_for
except ImportError:  # run from the repository root
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run_scale import OUT, data, head_for


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", choices=("ivf", "hnsw"), default="ivf")
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--M", type=int, default=32, help="HNSW graph degree")
    parser.add_argument("--ef-construction", type=int, default=80)
    parser.add_argument("--ef-search", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--storage", default="float16")
    args = parser.parse_args(argv)
    if args.index == "ivf":
        params, name, values = {"nlist": args.nlist, "nprobe": args.nprobe[0]}, "nprobe", args.nprobe
        title = f"IVF nprobe sweep: {args.size:,} support points, nlist {args.nlist}, {args.storage}"
    else:
        params = {"M": args.M, "efConstruction": args.ef_construction, "efSearch": args.ef_search[0]}
        name, values = "efSearch", args.ef_search
        title = (
            f"HNSW efSearch sweep: {args.size:,} support points, M {args.M}, efConstruction "
            f"{args.ef_construction}, {args.storage}"
        )
    head, build = head_for(args.size, args.index, args.storage, params)
    queries, _ = data(2000, seed=424242)
    approximate_index = head.support
    exact = approximate_index.exact_copy()
    head.support = exact
    started = time.perf_counter()
    reference = head.predict(queries)
    exact_seconds = time.perf_counter() - started
    head.support = approximate_index
    del exact
    lines = [
        "",
        f"## {title} (build {build:.0f} s; exact float32 predict of 2,000 queries: {exact_seconds:.1f} s)",
        "",
        f"| {name} | predict 2,000 | speed-up vs exact | same q | same d | same HR | same HR lower |",
        "|---|---|---|---|---|---|---|",
    ]
    for value in values:
        approximate_index.index.set_search_width(value)
        started = time.perf_counter()
        out = head.predict(queries)
        seconds = time.perf_counter() - started

        def same(a, b):
            return float((a == b).float().mean())

        lines.append(
            f"| {value} | {seconds:.2f} s | {exact_seconds / seconds:.1f}x | {same(out.q, reference.q):.3f} | "
            f"{same(out.d, reference.d):.3f} | {same(out.in_hr, reference.in_hr):.4f} | "
            f"{same(out.in_hr_lower, reference.in_hr_lower):.4f} |"
        )
        print(lines[-1], flush=True)
    with OUT.open("a") as handle:
        handle.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
