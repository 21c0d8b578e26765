"""Run by tests/features/test_distributed.py under a 2-process launcher (gloo, CPU) and on its own.

Writes ``<out>/rank<r>_of<w>.safetensors`` (the features of every case) and ``.json`` (what each
process saw: forward passes, cache reads and writes, errors, whether accelerate state exists).
"""

import faulthandler
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from safetensors.torch import save_file  # noqa: E402

import sdm_hf.features.cache as feature_cache  # noqa: E402
from sdm_hf.features.cache import cached_features  # noqa: E402
from sdm_hf.features.extract import extract_features  # noqa: E402
from tests import helpers  # noqa: E402

WORDS = [f"w{i}" for i in range(40)]
TEXTS = [  # 7 texts (uneven on 2 processes) of different lengths, so batches need padding
    "w1 w2 w3 w4 w5 w6 w7 w8 w9",
    "w10",
    "w11 w12 w13",
    "w14 w15 w16 w17 w18 w19",
    "w20 w21",
    "w22 w23 w24 w25 w26 w27 w28 w29 w30 w31 w32 w33",
    "w34 w35 w36 w37",
]


def tiny_bert():
    """The 2-layer, 32-wide BERT over :data:`WORDS` the cases run."""
    return helpers.tiny_bert(WORDS, hidden=32, layers=2, heads=4, max_positions=32, max_length=16)


class Calls:
    """Counts calls of a function replaced on a module (its original still runs)."""

    def __init__(self, module, name):
        self.count, original = 0, getattr(module, name)

        def counted(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        setattr(module, name, counted)


def main(out: str) -> None:
    faulthandler.enable()  # a hang or crash prints every thread's Python stack to stderr
    model, tokenizer = tiny_bert()
    forwards = [0]
    model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    common = {"pooling": "mean", "progress": False, "distributed": True}
    tensors = {
        "batch1": extract_features(model, tokenizer, TEXTS, batch_size=1, **common),
        "batch3": extract_features(model, tokenizer, TEXTS, batch_size=3, **common),
        "last": extract_features(model, tokenizer, TEXTS[:5], batch_size=2, **{**common, "pooling": "last"}),
        "one_text": extract_features(model, tokenizer, TEXTS[:1], **common),  # fewer texts than processes
        "local": extract_features(model, tokenizer, TEXTS, batch_size=3, pooling="mean", progress=False),
    }
    record: dict = {"forwards_extract": forwards[0]}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))

    # the cache: a miss (computed by all, written by the main process), then a hit (no model runs)
    writes, reads = Calls(feature_cache, "_write_entry"), Calls(feature_cache, "_read_entry")
    cache = {"model_id": "tiny-bert", "cache_dir": Path(out) / "cache", "batch_size": 1, **common}
    forwards[0] = 0
    tensors["cached_miss"] = cached_features(model, tokenizer, TEXTS, **cache)
    record.update(forwards_miss=forwards[0], writes_miss=writes.count, reads_miss=reads.count)
    forwards[0] = 0
    tensors["cached_hit"] = cached_features(model, tokenizer, TEXTS, **cache)
    record.update(forwards_hit=forwards[0], writes_hit=writes.count, reads_hit=reads.count)

    # processes given different texts: every one of them raises (none is left waiting)
    try:
        extract_features(model, tokenizer, TEXTS[: 6 + rank % 2], **common)
        record["different_texts"] = "no error"
    except ValueError as err:
        record["different_texts"] = str(err)

    # one process failing on its shard: it raises its error, the others name it
    def fail(*_):
        raise RuntimeError("boom on this process")

    handle = model.register_forward_pre_hook(fail) if rank == 1 else None
    try:
        extract_features(model, tokenizer, TEXTS, **common)
        record["one_fails"] = "no error"
    except RuntimeError as err:
        record["one_fails"] = str(err)
    if handle is not None:
        handle.remove()
    from accelerate.state import PartialState

    record.update(
        rank=rank,
        world=world,
        accelerate_state=bool(PartialState._shared_state),
        process_group=torch.distributed.is_available() and torch.distributed.is_initialized(),
    )
    stem = Path(out) / f"rank{rank}_of{world}"
    save_file({k: v.contiguous() for k, v in tensors.items()}, f"{stem}.safetensors")
    Path(f"{stem}.json").write_text(json.dumps(record))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # every process has written its results
    # as tests/lm/distributed_worker.py: leave without interpreter finalisation (gloo's threads
    # can abort the process at shutdown after all the work is written)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
