"""Running a worker script on one process or under a launcher (torchrun, accelerate launch),
for the suite's multi-process tests."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN_2 = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # a free local port


def run_worker(launcher: list[str], worker: Path, *worker_args) -> None:
    """``python [launcher] worker worker_args...`` from the repository root, offline, one thread
    per process, without an inherited WORLD_SIZE; fails the test with the end of stderr."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    res = subprocess.run(
        [sys.executable, *launcher, str(worker), *map(str, worker_args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-8000:]
