"""sdm_hf.features.distributed: one process (the plain path, no accelerate state) and two
(torchrun and accelerate launch, gloo on CPU) against one."""

import json
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sdm_hf.features.distributed as distributed_features
from sdm_hf.features.cache import cached_features
from sdm_hf.features.distributed import launched_processes, shard_order, texts_sha256
from sdm_hf.features.extract import extract_features
from tests.features.distributed_worker import TEXTS, tiny_bert
from tests.launch import run_worker

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "distributed_worker.py"


def test_launched_processes_reads_the_launchers_world_size(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launched_processes() == 1
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert launched_processes() == 3
    monkeypatch.setenv("WORLD_SIZE", "not a number")
    assert launched_processes() == 1


def test_one_process_is_the_plain_path_and_creates_no_state(monkeypatch, tmp_path):
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    def no_state():
        raise AssertionError("one process must not create accelerate state")

    monkeypatch.setattr(distributed_features, "process_state", no_state)
    model, tokenizer = tiny_bert()
    plain = extract_features(model, tokenizer, TEXTS, batch_size=3, progress=False)
    assert torch.equal(extract_features(model, tokenizer, TEXTS, batch_size=3, progress=False, distributed=True), plain)
    cached = {"model_id": "tiny-bert", "cache_dir": tmp_path, "batch_size": 3, "progress": False, "distributed": True}
    assert torch.equal(cached_features(model, tokenizer, TEXTS, **cached), plain)  # a miss, written
    assert torch.equal(cached_features(model, tokenizer, TEXTS, **cached), plain)  # a hit
    assert len(list((tmp_path / "features").glob("*.safetensors"))) == 1


def test_distributed_must_be_a_bool():
    model, tokenizer = tiny_bert()
    with pytest.raises(TypeError, match="distributed must be True or False"):
        extract_features(model, tokenizer, TEXTS, distributed="yes")
    with pytest.raises(TypeError, match="distributed must be True or False"):
        cached_features(model, tokenizer, TEXTS, model_id="tiny-bert", distributed=1)


def test_texts_hash_sees_boundaries_and_order():
    assert texts_sha256(["ab", "c"]) != texts_sha256(["a", "bc"])
    assert texts_sha256(["a", "b"]) != texts_sha256(["b", "a"])
    assert texts_sha256(["a"]) == texts_sha256(["a"])


@pytest.mark.parametrize("world", [2, 3, 4])
def test_accelerates_split_of_the_shard_order_deals_by_length(world):
    from accelerate import PartialState

    for n in range(1, 14):
        texts = [("x" * ((7 * i) % 5)) for i in range(n)]  # lengths with ties
        by_length = sorted(range(n), key=lambda i: -len(texts[i]))  # stable
        order = shard_order(texts, world)
        shards = []
        for rank in range(world):  # accelerate's own split, as process `rank` of `world` runs it
            process = type("Process", (), {"num_processes": world, "process_index": rank})()
            with PartialState.split_between_processes(process, order) as shard:
                shards.append(shard.tolist())
        assert shards == [by_length[rank::world] for rank in range(world)], (n, world)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCHERS = {
    "torchrun": lambda: ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    # what users type on GPUs is `accelerate launch --num_processes 2 script.py`; on a CPU-only
    # machine accelerate starts several processes only through its torchrun path (--multi_gpu)
    "accelerate": lambda: [
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
    ],
}


def _run(args, out):
    run_worker(args, WORKER, out)


def _results(out: Path, rank: int, world: int):
    stem = out / f"rank{rank}_of{world}"
    return json.loads(stem.with_suffix(".json").read_text()), load_file(f"{stem}.safetensors")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("one_process")
    _run([], out)
    return _results(out, 0, 1)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_processes_equal_one(tmp_path, launcher, single):
    _run(LAUNCHERS[launcher](), tmp_path)
    (r0, f0), (r1, f1) = _results(tmp_path, 0, 2), _results(tmp_path, 1, 2)
    one, feats = single
    assert (r0["world"], r1["world"], one["world"]) == (2, 2, 1)
    assert not one["accelerate_state"] and not one["process_group"]  # one process: no state at all
    for name in feats:  # every process has all N rows, in the input order
        assert torch.equal(f0[name], f1[name]), name
    # one text per forward pass: the same computation as one process, so bit for bit equal
    assert torch.equal(f0["batch1"], feats["batch1"]) and f0["batch1"].shape == (len(TEXTS), 32)
    assert torch.equal(f0["one_text"], feats["one_text"])  # fewer texts than processes
    # batches of 3 and 2 hold other texts than with one process (other padding): equal up to rounding
    for name in ("batch3", "last", "cached_miss", "cached_hit", "local"):
        torch.testing.assert_close(f0[name], feats[name], rtol=1e-5, atol=1e-6)
    # the work was shared: 7 texts one per pass -> 4 + 3 (and one process ran all 7)
    assert (r0["forwards_miss"], r1["forwards_miss"], one["forwards_miss"]) == (4, 3, 7)
    assert r0["forwards_extract"] + r1["forwards_extract"] == one["forwards_extract"] + 3  # "local": each all 7
    # one reader and one writer of the cache: the main process; a hit runs no model anywhere
    assert (r0["writes_miss"], r0["reads_miss"], r1["writes_miss"], r1["reads_miss"]) == (1, 0, 0, 0)
    assert (r0["writes_hit"], r0["reads_hit"], r1["writes_hit"], r1["reads_hit"]) == (1, 1, 0, 0)
    assert r0["forwards_hit"] == r1["forwards_hit"] == 0
    assert len(list((tmp_path / "cache" / "features").glob("*.safetensors"))) == 1
    # errors reach every process instead of leaving one waiting
    assert "different texts" in r0["different_texts"] and "different texts" in r1["different_texts"]
    assert r1["one_fails"] == "boom on this process"
    assert r0["one_fails"] == "feature extraction failed on process 1 of 2: RuntimeError: boom on this process"
    assert one["different_texts"] == one["one_fails"] == "no error"
