"""Run by tests/lm/test_distributed.py under torchrun: the main process's head fit fails; every
process must raise (none left waiting). Writes ``<out>/fail_rank<r>.json`` with what it raised."""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sdm_hf.lm import SDMTrainer  # noqa: E402
from sdm_hf.lm.head_fitting import VerificationHeadFitter  # noqa: E402
from tests.helpers import harvard_sentences, make_args, preference, tiny_causal_lm, tiny_tokenizer  # noqa: E402


def failing_fit(self, rows, seed, timing=None, features=None, keep_texts=False, calibration_mask=None):
    raise ValueError("injected failure of the head fit")


def main(out: str) -> None:
    rank = int(os.environ.get("RANK", "0"))
    VerificationHeadFitter.fit = failing_fit  # only the main process fits
    tok = tiny_tokenizer()
    args = make_args(Path(out), per_device_train_batch_size=4, ddp_backend="gloo")
    try:
        SDMTrainer(
            model=tiny_causal_lm(tok), args=args, train_dataset=preference(harvard_sentences(16)), processing_class=tok
        )
        raised = None
    except Exception as error:  # what each process saw
        raised = f"{type(error).__name__}: {error}"
    (Path(out) / f"fail_rank{rank}.json").write_text(json.dumps({"raised": raised}))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
