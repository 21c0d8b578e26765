"""sdm_hf.lm.distributed: one process (identities) and two (torchrun, gloo on CPU) against one."""

import json
from pathlib import Path

import pytest
import torch

from sdm_hf.lm.distributed import broadcast_head
from sdm_hf.utils.distributed import gather_lists, process_world
from tests.launch import TORCHRUN_2, run_worker

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "distributed_worker.py"


def test_one_process_is_rank_zero_and_needs_no_communication():
    head = object()  # one process never looks inside the head
    support = torch.tensor([3, -1, 0])
    assert process_world() == (0, 1)
    assert process_world(type("OneProcess", (), {"num_processes": 1, "process_index": 0})()) == (0, 1)
    assert gather_lists([(2, "b"), (0, "a")], (0, 1)) == [(2, "b"), (0, "a")]
    same_head, same_support = broadcast_head(head, support, (0, 1))
    assert same_head is head and same_support is support


def _run(args, out):
    run_worker(args, WORKER, out)


@pytest.mark.slow
def test_two_processes_share_one_head_and_one_cache(tmp_path):
    _run(TORCHRUN_2, tmp_path)
    _run([], tmp_path)
    r0, r1, single = (
        json.loads((tmp_path / name).read_text()) for name in ("rank0_of2.json", "rank1_of2.json", "rank0_of1.json")
    )
    assert (r0["world"], r1["world"], single["world"]) == (2, 2, 1)
    # one head (fitted on the main process, broadcast) and one merged cache on every process
    assert r0["epoch0_head"] == r1["epoch0_head"] and r0["final_head"] == r1["final_head"]
    assert r0["hard_negatives"] == r1["hard_negatives"] and r0["generated"] == r1["generated"]
    # before any training step the distributed run equals the single-process one
    assert r0["epoch0_head"] == single["epoch0_head"]
    assert r0["generated"][0] == single["generated"][0] == 0 and r0["generated"][1] > 0
    assert r0["loss_finite"] and r1["loss_finite"]


BATCH_WORKER = Path(__file__).resolve().parent / "global_batch_worker.py"


@pytest.mark.slow
def test_one_and_two_processes_take_the_same_steps_and_one_writes(tmp_path):
    """The same global batch (8 = 1 x 8 = 2 x 4): equal logged losses and gradient norms,
    equal heads, the per-epoch refresh figures in the log history, and the head written by
    one process only."""
    for launcher in ([], TORCHRUN_2):
        run_worker(launcher, BATCH_WORKER, tmp_path)
    single, r0, r1 = (
        json.loads((tmp_path / f"batch_{name}.json").read_text()) for name in ("rank0_of1", "rank0_of2", "rank1_of2")
    )
    assert len(single["losses"]) == 8 and len(single["grad_norms"]) == 8  # 2 epochs x 4 steps
    for run in (r0, r1):
        assert run["losses"] == pytest.approx(single["losses"], rel=1e-4)
        assert run["grad_norms"] == pytest.approx(single["grad_norms"], rel=1e-4)
        # the refresh's features come in the same batches whatever the number of processes:
        # before any step the heads are identical; after steps, equal to float rounding
        assert run["epoch0_head"] == single["epoch0_head"]
        assert run["epoch1_head"] == pytest.approx(single["epoch1_head"], rel=1e-4)
    # checkpoint, final model, save_sdm_model: by the main process only
    assert (single["head_writes"], r0["head_writes"], r1["head_writes"]) == (3, 3, 0)
    for run in (single, r0, r1):
        logged = run["refresh_logs"]
        assert [e["epoch"] for e in logged] == [0, 1]
        keys = {"sdm/head_hr_empty", "sdm/head_hr_admission", "sdm/head_calibration_loss", "sdm/head_fit_seconds"}
        assert keys <= set(logged[0])
    assert r0["refresh_logs"][1]["sdm/head_calibration_loss"] == r1["refresh_logs"][1]["sdm/head_calibration_loss"]


@pytest.mark.slow
def test_a_failed_head_fit_on_the_main_process_is_raised_on_every_process(tmp_path):
    run_worker(TORCHRUN_2, Path(__file__).resolve().parent / "failing_fit_worker.py", tmp_path)
    r0, r1 = (json.loads((tmp_path / f"fail_rank{r}.json").read_text())["raised"] for r in (0, 1))
    assert r0 == "ValueError: injected failure of the head fit"
    assert r1.startswith("RuntimeError: fitting the verification head failed on the main process: ValueError")
