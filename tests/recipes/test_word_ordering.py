"""The word-ordering recipe (recipes/word_ordering): data invariants and a smoke run."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "recipes" / "word_ordering"))

import train_base_model  # noqa: E402
import word_order_data as wod  # noqa: E402
import word_order_experiment as woe  # noqa: E402

from sdm_hf.lm import ControlTokens, encode_example  # noqa: E402

pytestmark = pytest.mark.slow  # the word-ordering experiment's pieces


@pytest.fixture(scope="module")
def splits():
    return wod.build_splits(seed=0)


def _content(message_list):
    return message_list[-1]["content"]


def test_negative_is_never_gold_and_shuffle_is_a_permutation(splits):
    data, _ = splits
    control = ControlTokens()
    for name in data:
        for row in data[name]:
            words = row["sentence"].split()
            gold_suffix = words[-3:]
            assert sorted(row["shuffled"].split()) == sorted(gold_suffix)
            assert row["prefix"] == " ".join(words[:-3])
            assert _content(row["chosen"]) == f"<sentence>{row['sentence']}</sentence>{wod.YES}"
            rejected = control.remove_suffix(_content(row["rejected"]))
            assert _content(row["rejected"]).endswith(wod.NO)
            bare = rejected.replace("<sentence>", "").replace("</sentence>", "")
            assert bare != row["sentence"]
            assert sorted(bare.split()) == sorted(words)
            assert bare.startswith(row["prefix"] + " ")


def test_tag_noise_rate_and_kinds(splits):
    data, _ = splits
    rejected = [_content(r) for name in data for r in data[name]["rejected"]]
    opening = np.array([not r.startswith("<sentence>") for r in rejected])
    closing = np.array(["</sentence>" not in r for r in rejected])
    noisy = opening | closing
    n = len(rejected)
    rate = noisy.mean()
    se = np.sqrt(wod.TAG_NOISE * (1 - wod.TAG_NOISE) / n)
    assert abs(rate - wod.TAG_NOISE) < 4 * se, rate
    kinds = [(opening & ~closing).sum(), (~opening & closing).sum(), (opening & closing).sum()]
    assert min(kinds) > 0.2 * noisy.sum()  # each of the three kinds ~ a third


def test_splits_are_disjoint_and_shifted_holds_the_longest(splits):
    data, summary = splits
    seen = {}
    for name in ("sft", "train", "calibration", "test", "shifted"):
        for s in data[name]["sentence"]:
            assert s not in seen, (s, name, seen.get(s))
            seen[s] = name
    longest_other = max(len(s.split()) for n in ("sft", "train", "calibration", "test") for s in data[n]["sentence"])
    assert summary["shifted_min_words"] >= longest_other
    assert len(data["harvard"]) == summary["sentences"]["harvard"] == 720
    assert summary["skipped"]["too_short"] > 0  # the shipped data has a few short statements


def test_bad_lines_are_skipped_and_counted(tmp_path):
    path = tmp_path / "sentences.txt"
    path.write_bytes(
        b"The cat sat on the mat.\nToo short here\n\xff\xfe not utf-8 at all\nWe saw it it it\n"
        b"The cat   sat on the mat.\n"
    )
    skipped = wod.SkipCounts()
    kept = wod.usable(wod.read_lines(path, skipped), skipped)
    assert kept == ["The cat sat on the mat."]
    assert skipped.as_dict() == {"too_short": 1, "no_wrong_order": 1, "not_utf8": 1, "duplicate": 1}
    with pytest.raises(ValueError, match="no wrong order"):
        wod.make_example("We saw it it it", np.random.default_rng(0))


def test_sentence_parser():
    assert wod.sentence_of("<sentence> a b c </sentence><verified>Yes</verified>") == "a b c"
    assert wod.sentence_of("a b c</sentence>") is None
    assert wod.sentence_of("<sentence>a b c") is None


def test_contrastive_mask_on_task_documents(tmp_path):
    """The prompt contains both control strings; a negative trains only its final suffix onward."""
    tokenizer = train_base_model.train_tokenizer(["The birch canoe slid on the smooth planks."] * 5, 400)
    row = wod.make_example("The birch canoe slid on the smooth planks.", np.random.default_rng(1))
    control = ControlTokens()
    assert control.yes in row["prompt"][0]["content"] and control.no in row["prompt"][0]["content"]
    for column, positive in (("chosen", True), ("rejected", False)):
        enc = encode_example(tokenizer, row["prompt"], _content(row[column]), positive, control)
        trained = [t for t, label in zip(enc["input_ids"], enc["labels"]) if label != -100]
        text = tokenizer.decode(trained)
        if positive:
            assert text == _content(row["chosen"]) + "<|end|>"
        else:
            assert text == "<verified>No</verified><|end|>"


def test_output_folder_is_refused_or_resumed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(FileExistsError, match="--resume"):
        woe.prepare_folder(woe.parse_args(["--out", str(out)]))
    woe.prepare_folder(woe.parse_args(["--out", str(out), "--resume"]))  # first resume records settings
    with pytest.raises(ValueError, match="other settings"):
        woe.prepare_folder(woe.parse_args(["--out", str(out), "--resume", "--epochs", "7"]))
    # --overwrite never deletes files sdm_hf did not write: "something" was there before the resume
    with pytest.raises(FileExistsError, match=r"did not write \(something\)"):
        woe.prepare_folder(woe.parse_args(["--out", str(out), "--overwrite", "--epochs", "7"]))
    assert (out / "something").is_file()
    assert json.loads((out / ".sdm_hf_output.json").read_text())["not_ours"] == ["something"]
    # ... and replaces one it did
    ours = tmp_path / "ours"
    woe.prepare_folder(woe.parse_args(["--out", str(ours)]))
    (ours / "runs").mkdir()
    woe.prepare_folder(woe.parse_args(["--out", str(ours), "--overwrite", "--epochs", "7"]))
    assert not (ours / "runs").exists() and (ours / ".sdm_hf_output.json").is_file()


def test_smoke_run_of_the_whole_recipe(tmp_path):
    base = tmp_path / "base"
    train_base_model.main(
        [
            "--out",
            str(base),
            "--limit",
            "16",
            "--epochs",
            "1",
            "--hidden",
            "32",
            "--layers",
            "1",
            "--heads",
            "2",
            "--intermediate",
            "64",
            "--vocab-size",
            "400",
            "--eval-size",
            "4",
        ]
    )
    report = json.loads((base / "training_report.json").read_text())
    assert report["sft_rows"] == 16 * 4 and (base / "model.safetensors").is_file()
    out = tmp_path / "exp"
    argv = [
        "--base-model",
        str(base),
        "--out",
        str(out),
        "--train-size",
        "12",
        "--calibration-size",
        "12",
        "--test-size",
        "6",
        "--harvard-size",
        "6",
        "--shifted-size",
        "6",
        "--epochs",
        "1",
        "--head-epochs",
        "2",
        "--max-new-tokens",
        "8",
        "--hard-negatives-from-epoch",
        "0",
        "--search-depth",
        "2",
        "--search-alphas",
        "0.95",
        "0.6",
        "--head-procedure",
        "fast",
        "--runs",
        "FT(CM+HN)",
        "SDM+FT(CM+HN)",
    ]
    assert woe.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["runs"]) == {"FT(CM+HN)", "SDM+FT(CM+HN)"}
    for run in results["runs"].values():
        assert set(run["test"]) == {"test", "harvard", "shifted"}
        assert run["test"]["harvard"]["n"] == 6
        assert run["epoch_log"][0]["generated"] > 0  # hard negatives were generated from epoch 0
        assert [s["alpha"] for s in run["search"]] == [0.95, 0.6]  # one search per alpha
        for search in run["search"]:  # test-time search: shares within 1 and 2 attempts, never falling
            assert search["depth"] == 2 and search["n"] == 6 and 6 <= search["attempts_made"] <= 12
            assert 0.0 <= search["verified_after"][0] <= search["verified_after"][1] <= 1.0
            assert 0 <= search["calibration_admitted"] <= run["final_heads"]["mixed"]["calibration_points"]
            per = search["per_attempt"]
            assert per["made"][0] == 6 and sum(per["made"]) == search["attempts_made"]
            assert all(y <= m and h <= m for m, y, h in zip(per["made"], per["head_yes"], per["in_hr_region"]))
    table = (out / "tables.md").read_text()
    assert "HR accuracy" in table and "sentence accuracy" in table and "SDM+FT(CM+HN)" in table
    assert (out / "admitted_vs_alpha.png").is_file() and (out / "command.txt").is_file()
    assert (out / "search.png").is_file()
    assert "Test-time search (SDM+FT(CM+HN), alpha = 0.6:" in table and "procedure 'fast'" in table
    done = out / "runs" / "sdm_ft_cm_hn" / "metrics.json"
    stamp = done.stat().st_mtime_ns
    assert woe.main(argv + ["--resume"]) == 0  # finished runs are reused, not redone
    assert done.stat().st_mtime_ns == stamp


def tiny_base_model(tmp_path):
    """A one-layer base model of the recipe, trained on 16 sentences (seconds)."""
    base = tmp_path / "base"
    train_base_model.main(
        ["--out", str(base), "--limit", "16", "--epochs", "1", "--hidden", "32", "--layers", "1", "--heads", "2"]
        + ["--intermediate", "64", "--vocab-size", "400", "--eval-size", "4"]
    )
    return base


def test_seed_study_reports_every_alpha_head_and_class_and_resumes(tmp_path):
    base = tiny_base_model(tmp_path)
    out = tmp_path / "study"
    argv = ["--base-model", str(base), "--out", str(out), "--train-size", "12", "--calibration-size", "24"]
    argv += ["--test-size", "8", "--harvard-size", "4", "--shifted-size", "4", "--epochs", "1", "--head-epochs", "2"]
    argv += ["--max-new-tokens", "8", "--runs", "FT(CM)", "SDM+FT(CM)", "--seeds", "0", "1"]
    argv += ["--extra-alphas", "0.9", "0.6"]
    assert woe.main(argv) == 0
    summary = json.loads((out / "comparison.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["heads"] == ["mixed", "generations"]
    assert summary["alphas"] == [0.95, 0.9, 0.6]
    # every head x test set x alpha x run, and one paired comparison per head x test set x alpha
    assert len(summary["rows"]) == 2 * 3 * 3 * 2 and len(summary["pairs"]) == 2 * 3 * 3
    for seed in (0, 1):
        results = json.loads((out / f"seed_{seed}" / "results.json").read_text())
        assert results["settings"]["seed"] == seed and results["settings"]["split_seed"] == 0
        run = results["runs"]["SDM+FT(CM)"]
        assert set(run["final_heads"]) == {"mixed", "generations"}
        assert set(run["final_heads"]["mixed"]["calibration_hr_admitted_at"]) == {"0.95", "0.9", "0.6"}
        own = run["final_heads"]["generations"]  # the tiny model's generations are all wrong: no head ...
        assert "unavailable" in own and "at least 2 of each" in own["unavailable"]
        assert all(t["tiers"]["generations"][k]["admitted"] == 0 for t in run["test"].values() for k in ("0.9", "0.6"))
        for test in run["test"].values():
            for kind in ("mixed", "generations"):
                for counts in test["tiers"][kind].values():
                    per = counts["per_class"]
                    assert counts["n"] == test["n"] and per["No"]["n"] + per["Yes"]["n"] == test["n"]
                    assert counts["admitted"] == per["No"]["admitted"] + per["Yes"]["admitted"]
                    assert counts["correct"] <= counts["admitted"]
        records = [
            json.loads(x) for x in (out / f"seed_{seed}" / "runs" / "sdm_ft_cm" / "generations_test.jsonl").open()
        ]
        assert len(records) == 8 and set(records[0]["heads"]) == {"mixed", "generations"}
        for record in records:  # each tier's flag, per head: the counts above come from these
            assert set(record["heads"]["mixed"]["high_reliability_at"]) == {"0.6", "0.9", "0.95"}
            assert record["heads"]["generations"] is None  # ... which admits nothing, and the tables say why
    assert "no head: the model's own generations" in (out / "seed_0" / "tables.md").read_text()
    for pair in summary["pairs"]:  # per-seed differences of admitted shares, and their mean
        assert len(pair["difference_per_seed"]) == 2 and pair["t_interval_95"] is not None
        low, high = pair["t_interval_95"]
        assert low <= pair["difference_mean"] <= high
    table = (out / "comparison.md").read_text()
    assert "SDM+FT(CM) vs FT(CM)" in table and "y=No" in table and "Seeds: 0, 1" in table
    assert (out / "admitted_vs_alpha.png").is_file() and (out / "seed_1" / "tables.md").is_file()
    done = out / "seed_0" / "runs" / "ft_cm" / "metrics.json"
    stamp = done.stat().st_mtime_ns
    assert woe.main(argv[:-5] + ["0", "1", "2", "--resume", "--extra-alphas", "0.9", "0.6"]) == 0  # one more seed
    assert done.stat().st_mtime_ns == stamp and json.loads((out / "comparison.json").read_text())["seeds"] == [0, 1, 2]


def test_report_statistics():
    import word_order_report as report

    assert report.t_interval([0.1]) is None
    mean, low, high = report.t_interval([0.0, 0.1, 0.2])
    assert mean == pytest.approx(0.1) and high - mean == pytest.approx(4.303 * 0.1 / 3**0.5, rel=1e-6)
    assert report.verdict(0, 0, 0.9) == "R" and report.verdict(19, 20, 0.9) == "yes"
    assert report.verdict(17, 20, 0.9) == "below (interval reaches alpha)" and report.verdict(5, 20, 0.9) == "below"
    counts = {"per_class": {"No": {"admitted": 4, "correct": 0}, "Yes": {"admitted": 10, "correct": 10}}}
    assert report.class_check(counts, 0.9) == "No below"
    assert report.rate(0, 0) == "R (0)" and report.rate(9, 10).startswith("9/10 = 0.900 [0.60, 0.98]")


def test_plain_prompt_format_for_base_models_trains_the_completion_and_eos():
    import word_order_models as wom

    from sdm_hf.lm.control import generation_prompt
    from tests.helpers import tiny_tokenizer

    tokenizer = tiny_tokenizer(chat_template=False)
    tokenizer.chat_template = wom.PLAIN_PROMPT_TEMPLATE
    row = wod.make_example("The birch canoe slid on the smooth planks.", np.random.default_rng(1), wod.PROMPT_TEMPLATE)
    prompt = generation_prompt(tokenizer, row["prompt"])
    assert prompt == "<s>" + _content(row["prompt"]) + "\n\n"
    enc = encode_example(tokenizer, row["prompt"], _content(row["chosen"]), True)
    trained = tokenizer.decode([t for t, label in zip(enc["input_ids"], enc["labels"]) if label != -100])
    assert trained == _content(row["chosen"]) + "</s>"


def test_presets_fill_only_what_the_command_line_left_unset():
    args = woe.parse_args(["--preset", "gpu", "--epochs", "1"])
    assert args.base_model == "gemma-3-270m" and args.corpus == "reviews" and args.prompt == "paper"
    assert args.epochs == 1 and args.learning_rate == 5e-5 and args.bf16 and args.select_best
    assert args.out == woe.HERE / "results" / "gemma-3-270m"
    plain = woe.parse_args([])
    assert plain.corpus == "saplma" and plain.batch_size == 16 and not plain.select_best and plain.lora_rank == 0
    with pytest.raises(SystemExit):
        woe.parse_args(["--evaluations-per-epoch", "0"])


def test_smoke_run_with_lora_and_checkpoint_selection_twice_per_epoch(tmp_path):
    base = tiny_base_model(tmp_path)
    out = tmp_path / "exp"
    argv = ["--base-model", str(base), "--out", str(out), "--train-size", "16"]
    argv += ["--calibration-size", "12", "--test-size", "4", "--harvard-size", "4", "--shifted-size", "4"]
    argv += ["--epochs", "1", "--batch-size", "4", "--head-epochs", "2", "--max-new-tokens", "8"]
    argv += ["--select-best", "--evaluations-per-epoch", "2", "--lora-rank", "2", "--runs", "SDM+FT(CM)"]
    assert woe.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["device"]["kind"] in {"cpu", "cuda"} and results["data"]["corpus"] == "saplma"
    run = results["runs"]["SDM+FT(CM)"]
    assert run["best_checkpoint"] is not None and "checkpoint-" in run["best_checkpoint"]
    assert run["best_eval_loss"] is not None and run["device"] == results["device"]
    assert [e["step"] for e in run["evaluations"]] == [2, 4]  # 4 steps per epoch, evaluated twice
    assert run["best_eval_loss"] == min(e["eval_loss"] for e in run["evaluations"])
    assert {"hard-negative generation", "head refresh (features + fit)", "test generation + verification"} <= set(
        run["seconds"]
    )
    assert "LoRA r=2" in (out / "tables.md").read_text()
