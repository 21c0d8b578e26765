"""What `import sdm_hf` costs a fresh interpreter: wall time and resident memory. Not part of the tests.

    python benchmarks/import_cost.py                       # this checkout's sdm_hf
    python benchmarks/import_cost.py --repeats 9
    python benchmarks/import_cost.py --also before=/tmp/old   # and another checkout (PYTHONPATH)

    # another commit, e.g. the one before the pipelines stopped importing transformers.pipelines:
    git worktree add /tmp/old 930bdc9 && python benchmarks/import_cost.py --also 930bdc9=/tmp/old
    git worktree remove /tmp/old

Each repeat is a new `python -c` process (same interpreter and venv as this script) that times
`import sdm_hf` with perf_counter, then reports its peak resident set (ru_maxrss), its resident
set after the import (VmRSS) and which heavy packages the import loaded; the whole process's
wall time (interpreter start-up included) is timed from outside. The targets take turns (round
robin), so a change in the machine's load falls on all alike; medians over the repeats.

Writes benchmarks/results/import_cost.md and .json, with the machine. Under a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from run_core import machine  # noqa: E402

RESULTS = HERE / "results"
# packages whose import dominates the cost; reported loaded or not
HEAVY = ("torch", "faiss", "transformers", "transformers.pipelines", "transformers.trainer", "datasets", "accelerate")

_CHILD = """
import json, resource, sys, time
started = time.perf_counter()
import sdm_hf
seconds = time.perf_counter() - started
rss_kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:"))
print(json.dumps({
    "import_seconds": seconds,
    "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    "rss_gib": rss_kb / 2**20,
    "loaded": [m for m in HEAVY if m in sys.modules],
    "sdm_hf_file": sdm_hf.__file__,
}))
"""


def measure_once(pythonpath: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = pythonpath
    code = f"HEAVY = {HEAVY!r}\n" + _CHILD
    started = time.perf_counter()
    # run outside any checkout: `python -c` puts its working directory first on sys.path
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tempfile.gettempdir(), check=False
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"import sdm_hf failed (PYTHONPATH={pythonpath!r}):\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    if not row["sdm_hf_file"].startswith(pythonpath):
        raise SystemExit(f"sdm_hf came from {row['sdm_hf_file']}, not from {pythonpath}")
    row["process_seconds"] = wall
    return row


def summarise(label: str, pythonpath: str, runs: list[dict]) -> dict:
    repeats = len(runs)
    median = {key: statistics.median(r[key] for r in runs) for key in ("import_seconds", "process_seconds")}
    median |= {key: statistics.median(r[key] for r in runs) for key in ("peak_rss_gib", "rss_gib")}
    return {
        "label": label,
        "pythonpath": pythonpath,
        "sdm_hf_file": runs[0]["sdm_hf_file"],
        "repeats": repeats,
        "median": median,
        "min_import_seconds": min(r["import_seconds"] for r in runs),
        "max_import_seconds": max(r["import_seconds"] for r in runs),
        "loaded": runs[0]["loaded"],
    }


def git_head() -> str:
    """HEAD's short hash, "+ local changes" when sdm_hf/ differs from it."""
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    changed = subprocess.run([*git, "status", "--porcelain", "sdm_hf"], capture_output=True, text=True).stdout.strip()
    return (head or "unknown") + (" + local changes" if changed else "")


def markdown(results: dict) -> str:
    lines = [
        "# `import sdm_hf`: time and resident memory (fresh interpreter)",
        "",
        f"Machine: {results['machine']}. Date: {results['date']}. Command: `{results['command']}`.",
        "",
        f"Medians over {results['repeats']} new processes each. *import* is `import sdm_hf` timed inside the "
        "process; *process* is the whole `python -c` from outside (interpreter start-up included); peak RSS is "
        "ru_maxrss, RSS is VmRSS after the import.",
        "",
        "| code | import | (min-max) | process | peak RSS | RSS after import | heavy packages loaded |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        m = row["median"]
        lines.append(
            f"| {row['label']} | {m['import_seconds']:.2f} s | {row['min_import_seconds']:.2f}-"
            f"{row['max_import_seconds']:.2f} s | {m['process_seconds']:.2f} s | {m['peak_rss_gib']:.3f} GiB | "
            f"{m['rss_gib']:.3f} GiB | {', '.join(row['loaded']) or '-'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="also measure the sdm_hf found on PATH (a checkout or worktree, put first on PYTHONPATH)",
    )
    parser.add_argument("--out", default=str(RESULTS / "import_cost"), help="result path without suffix")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    targets: list[tuple[str, str]] = []
    for item in args.also:
        label, sep, path = item.partition("=")
        if not sep or not Path(path, "sdm_hf", "__init__.py").is_file():
            parser.error(f"--also {item!r}: expected LABEL=PATH with PATH/sdm_hf/__init__.py")
        targets.append((label, str(Path(path).resolve())))
    targets.append((f"this checkout ({git_head()})", str(ROOT)))
    results = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "command": shlex.join(["python", "benchmarks/import_cost.py", *(sys.argv[1:] if argv is None else argv)]),
        "repeats": args.repeats,
        "rows": [],
    }
    # round robin, so that a change in the machine's load falls on every target alike
    runs: list[list[dict]] = [[] for _ in targets]
    for _ in range(args.repeats):
        for (_, path), into in zip(targets, runs):
            into.append(measure_once(path))
    for (label, path), done in zip(targets, runs):
        results["rows"].append(summarise(label, path, done))
        print(json.dumps(results["rows"][-1]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
