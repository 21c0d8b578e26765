"""Scale benchmarks (issue: large support sets): predict throughput, agreement and memory.

    python benchmarks/run_scale.py --one 100000 ivf float32 '{"nlist": 256, "nprobe": 16}'

One configuration per process (benchmarks/run_bench.py, i.e. `make bench`, runs them all);
prints one JSON line.

Synthetic clustered data (40 Gaussian clusters in 64 dims, labels by cluster parity, 5%
label noise), an SDM head (M = 1000) trained briefly on 4,000 points, whose support is then
the N points (added in chunks of 200,000); 2,000 calibration points; predict on 2,000
batched queries and 50 one-at-a-time queries. For each index (exact flat, IVF, HNSW;
float32 or float16 storage) it reports build time, batched predict time, the time of the
bare FAISS search the prediction contains (one k = 32 search of the same exemplars),
batch-of-one latency, agreement with exact search (q, d, HR) and the process's resident
memory after predict and the peak; for float16 flat storage also a fresh process that loads
the saved head and predicts (what a serving process holds). benchmarks/results/scale.md holds an earlier, single-process
run of these measurements.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from sdm_hf import SDMConfig, SDMHead, fit_sdm_head

OUT = Path(__file__).resolve().parent / "results" / "scale.md"
DIM = 64


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
                procedure="paper",
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


def status_gb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in GiB."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def load_and_predict(folder: str) -> dict:
    """What a serving process holds: a fresh process that imports sdm_hf, loads the saved
    head and predicts the 2,000 queries (run with ``--load-predict FOLDER``)."""
    started = time.perf_counter()
    head = SDMHead.from_pretrained(folder)
    load = time.perf_counter() - started
    rss_loaded = status_gb("VmRSS")
    queries, _ = data(2000, seed=424242)
    started = time.perf_counter()
    head.predict(queries)
    return {
        "load_seconds": load,
        "predict_seconds": time.perf_counter() - started,
        "rss_after_load_gb": rss_loaded,
        "rss_after_predict_gb": status_gb("VmRSS"),
        "peak_rss_gb": status_gb("VmHWM"),
    }


def child_result(done: subprocess.CompletedProcess) -> dict:
    """The JSON object a child benchmark process printed last, or ``{"error": <its output's
    tail>}`` when it failed or printed none."""
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr or done.stdout)[-400:]}
    return json.loads(lines[-1])


def saved_then_loaded(head: SDMHead) -> dict:
    """Save ``head`` to a temporary folder and measure :func:`load_and_predict` on it."""
    with tempfile.TemporaryDirectory() as folder:
        head.save_pretrained(folder)
        done = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--load-predict", folder],
            capture_output=True,
            text=True,
            check=False,
        )
    return child_result(done)


def measure(n: int, index_type: str, storage: str, params: dict | None) -> dict:
    """One configuration, measured in this process (run it in a fresh one for memory)."""
    head, build = head_for(n, index_type, storage, params)
    queries, _ = data(2000, seed=424242)
    started = time.perf_counter()
    out = head.predict(queries)
    predict = time.perf_counter() - started
    rss_after = status_gb("VmRSS")
    exemplars, _ = head.encode_for_inference(queries, 8192)
    started = time.perf_counter()
    head.support.search(exemplars, 32)
    bare = time.perf_counter() - started
    started = time.perf_counter()
    for i in range(50):
        head.predict(queries[i : i + 1])
    single = (time.perf_counter() - started) / 50
    peak = status_gb("VmHWM")  # before the exact reference below is built
    row = {
        "support": n,
        "index": index_type,
        "storage": storage,
        "params": head.support.index_params if index_type != "flat" else None,
        "build_seconds": build,
        "predict_seconds": predict,
        "bare_seconds": bare,
        "single_ms": single * 1000,
        "hr_admitted": int(out.in_hr.sum()),
        "rss_after_predict_gb": rss_after,
        "peak_rss_gb": peak,
        "agreement": None,
        "speedup_vs_exact": 1.0 if head.support.exact else None,
    }
    if index_type == "flat" and storage == "float16":  # the memory target: measured as served
        row["loaded"] = saved_then_loaded(head)
    if not head.support.exact:  # the exact float32 reference over the same exemplars
        approximate = head.support
        head.support = approximate.exact_copy()
        started = time.perf_counter()
        reference = head.predict(queries)
        exact_seconds = time.perf_counter() - started

        def same(a, b):
            return float((a == b).float().mean())

        row["agreement"] = {
            "same_q": same(out.q, reference.q),
            "same_d": same(out.d, reference.d),
            "same_hr": same(out.in_hr, reference.in_hr),
            "same_hr_lower": same(out.in_hr_lower, reference.in_hr_lower),
        }
        row["exact_seconds"] = exact_seconds
        row["speedup_vs_exact"] = exact_seconds / predict
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--one", nargs=4, metavar=("N", "INDEX", "STORAGE", "PARAMS_JSON"))
    mode.add_argument("--load-predict", metavar="FOLDER", help="load a saved head and predict (used by --one)")
    args = parser.parse_args(argv)
    if args.load_predict:
        print(json.dumps(load_and_predict(args.load_predict)), flush=True)
        return 0
    n, index_type, storage, params = args.one
    print(json.dumps(measure(int(n), index_type, storage, json.loads(params))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
