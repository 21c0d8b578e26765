import builtins
import copy
import json
import math
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdm_hf import SDMConfig, SDMHead, fit_sdm_head
from sdm_hf.head.serialization import FORMAT_VERSION, SDMFormatError
from tests.helpers import gaussian_mixture

FIELDS = (
    "logits",
    "probabilities",
    "q",
    "d",
    "d_nearest",
    "nearest_index",
    "rescaled_similarity",
    "is_ood",
    "in_hr",
    "in_hr_lower",
    "d_lower",
    "probabilities_lower",
    "effective_sample_size",
)


@pytest.fixture(scope="module")
def _fitted_heads():
    out = {}
    for classes in (2, 4):
        x, y = gaussian_mixture(900, classes, 8, separation=3.0, label_noise=0.02, seed=classes)
        cfg = SDMConfig(
            input_dim=8, num_classes=classes, exemplar_dim=32, alpha=0.9, id2label={c: f"c{c}" for c in range(classes)}
        )
        head = fit_sdm_head(
            x[:300],
            y[:300],
            x[300:600],
            y[300:600],
            cfg,
            procedure="paper",  # a fixed, quick fit: these tests are about what is saved
            epochs=20,
            shuffles=1,
            learning_rate=3e-3,
            resplit=False,
            progress=False,
            train_texts=[f"text {i}" for i in range(300)],
            calib_texts=[f"text {i}" for i in range(300, 600)],
            train_ids=list(range(300)),
            calib_ids=list(range(300, 600)),
        )
        out[classes] = (head, x[600:])
    return out


@pytest.fixture
def heads(_fitted_heads):
    """classes -> ``(head, x)``: fitted 2- and 4-class heads, a fresh copy for every test."""
    return {k: (copy.deepcopy(head), x.clone()) for k, (head, x) in _fitted_heads.items()}


def _same_outputs(a, b, x):
    out_a, out_b = a.predict(x), b.predict(x)
    for field in FIELDS:
        assert torch.equal(getattr(out_a, field), getattr(out_b, field)), field
    assert out_a.nearest_id == out_b.nearest_id


@pytest.mark.parametrize("classes", [2, 4])
@pytest.mark.parametrize("texts", [True, False])
def test_round_trip_is_bit_identical(heads, tmp_path, classes, texts):
    head, x = heads[classes]
    if not texts:
        head.support_ids = head.support_texts = None
    head.save_pretrained(tmp_path / "head")
    files = sorted(p.name for p in (tmp_path / "head").iterdir())
    expected = ["README.md", "config.json", "model.safetensors"] + (["support_documents.jsonl"] if texts else [])
    assert files == sorted(expected)
    loaded = SDMHead.from_pretrained(tmp_path / "head")
    _same_outputs(head, loaded, x)
    assert loaded.config == head.config and loaded.q_min == head.q_min
    assert torch.equal(loaded.thresholds, head.thresholds)
    # the fit's in-memory selection (training advice) is not saved: everything else must match
    reports = [h.calibration_report().to_dict() for h in (head, loaded)]
    advice = [r["diagnosis"].pop("advice") for r in reports]
    assert reports[0] == reports[1] and set(advice[1]) <= set(advice[0])
    # a loaded head recalibrates exactly like the original
    for h in (head, loaded):
        h.recalibrate(alpha=0.8)
    _same_outputs(head, loaded, x)
    loaded.recalibrate(recompute=True)  # stored calibration features make this possible
    head.recalibrate(recompute=True)
    _same_outputs(head, loaded, x)


def test_loaded_head_keeps_nothing_of_the_file_mapped(heads, tmp_path, monkeypatch):
    """safetensors hands out views of ONE memory map of the file: any view the head kept
    (labels, say) would keep the whole file mapped, and its read pages (the exemplars,
    gigabytes at scale) resident beside FAISS's own copy."""
    import dataclasses

    import sdm_hf.head.serialization_checks

    monkeypatch.setattr(sdm_hf.head.serialization_checks, "_FINITE_CHUNK", 7)  # the chunked NaN check, many chunks
    head = copy.deepcopy(heads[2][0])
    head.save_pretrained(tmp_path)
    loaded = SDMHead.from_pretrained(tmp_path)
    kept = dict(loaded.state_dict(), labels=loaded.support.labels, predictions=loaded.support.predictions)
    kept.update(
        (f.name, getattr(loaded.calibration, f.name))
        for f in dataclasses.fields(loaded.calibration)
        if isinstance(getattr(loaded.calibration, f.name), torch.Tensor)
    )
    kept.update((f"list{i}", t) for i, t in enumerate(loaded.calibration.distance_lists))
    assert len(kept) > 15
    mapping = (tmp_path / "model.safetensors").stat().st_size
    for name, tensor in kept.items():  # a view into the file's mapping would see all of it
        assert tensor.untyped_storage().nbytes() < mapping // 2, name
    assert not loaded.support.index.owns_vectors  # and the exemplars live in FAISS only


def test_saving_reads_the_exemplars_in_place(heads):
    from sdm_hf.head.serialization import state_to_files

    head = heads[2][0]
    tensors = state_to_files(head)[1]  # a head is taken without copies, as saving does
    # no copy of the (possibly gigabytes of) exemplars: the tensor written is FAISS's storage
    assert tensors["support.vectors"].data_ptr() == head.support.stored_vectors().data_ptr()
    assert torch.equal(tensors["support.vectors"], head.support.vectors)


def test_nan_anywhere_in_the_exemplars_is_detected(heads, tmp_path, monkeypatch):
    import sdm_hf.head.serialization_checks

    monkeypatch.setattr(sdm_hf.head.serialization_checks, "_FINITE_CHUNK", 5)
    head = copy.deepcopy(heads[2][0])
    head.save_pretrained(tmp_path)

    def poison(tensors):
        vectors = tensors["support.vectors"].clone()
        vectors[-1, -1] = float("nan")  # in the last chunk
        tensors["support.vectors"] = vectors

    _corrupt_tensors(tmp_path, poison)
    with pytest.raises(SDMFormatError, match="NaN"):
        SDMHead.from_pretrained(tmp_path)


def test_strict_json_for_empty_region(heads, tmp_path):
    head = copy.deepcopy(heads[2][0])
    with pytest.warns(UserWarning):
        head.recalibrate(alpha=1.0)
    head.save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    assert json.loads(text)["calibration"]["q_min"] is None
    assert SDMHead.from_pretrained(tmp_path).q_min == float("inf")
    assert "empty" in (tmp_path / "README.md").read_text()


def test_loading_never_unpickles(heads, tmp_path, monkeypatch):
    heads[2][0].save_pretrained(tmp_path)

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle / torch.load used while loading an SDM head")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    real_open = builtins.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if str(file).endswith((".pkl", ".pt", ".bin", ".pickle")):
            raise AssertionError(f"opened {file}")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    SDMHead.from_pretrained(tmp_path).predict(heads[2][1][:5])


def _corrupt_tensors(path, edit, keep_metadata=True):
    """Edit a saved head's tensors in place (keeping the embedded config unless told not to)."""
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        metadata = handle.metadata() if keep_metadata else None
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata=metadata)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda t: t.__setitem__("calibration.d", t["calibration.d"].clone().fill_(float("nan"))), "NaN"),
        (lambda t: t.__setitem__("support.labels", t["support.labels"][:-1].clone()), "support.labels"),
        (lambda t: t.__setitem__("support.vectors", t["support.vectors"].double()), "dtype"),
        (lambda t: t.pop("classifier.bias"), "missing tensor 'classifier.bias'"),
        (lambda t: t.__setitem__("extra", torch.zeros(1)), "unexpected tensor"),
        (lambda t: t.__setitem__("calibration.labels", t["calibration.labels"] + 5), "outside"),
        (
            lambda t: t.__setitem__("calibration.distance_lists", t["calibration.distance_lists"].flip(0).clone()),
            "not sorted",
        ),
        (lambda t: t.__setitem__("feature_std", torch.tensor(0.0)), "feature_std"),
    ],
)
def test_corrupted_tensors_are_detected(heads, tmp_path, edit, match):
    heads[2][0].save_pretrained(tmp_path)
    _corrupt_tensors(tmp_path, edit)
    with pytest.raises(SDMFormatError, match=match) as info:
        SDMHead.from_pretrained(tmp_path)
    assert "model.safetensors" in str(info.value)


def _edit_config(folder, edit):
    """Edit a saved head's config where loading reads it: the copy embedded in
    model.safetensors' metadata (and its config.json mirror, so the two agree)."""
    from safetensors import safe_open

    from sdm_hf.head.serialization import EMBEDDED_CONFIG_KEY

    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    config = json.loads(metadata[EMBEDDED_CONFIG_KEY])
    edit(config)
    text = json.dumps(config)
    save_file(tensors, str(folder / "model.safetensors"), metadata={**metadata, EMBEDDED_CONFIG_KEY: text})
    (folder / "config.json").write_text(text)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c.__setitem__("sdm_hf_format_version", FORMAT_VERSION + 1), "newer sdm_hf"),
        (lambda c: c.pop("sdm_hf_format_version"), "not an SDM head config"),
        (lambda c: c["config"].__setitem__("input_dim", 9), "shape"),
        (lambda c: c["config"].__setitem__("alpha", 2.0), "invalid SDMConfig"),
        (lambda c: c["calibration"].__setitem__("thresholds", [0.5]), "thresholds"),
        (lambda c: c["support"].__setitem__("size", 3), "expected 3"),
    ],
)
def test_corrupted_config_is_detected(heads, tmp_path, edit, match):
    heads[2][0].save_pretrained(tmp_path)
    _edit_config(tmp_path, edit)
    with pytest.raises(SDMFormatError, match=match):
        SDMHead.from_pretrained(tmp_path)


def test_bad_files(heads, tmp_path):
    with pytest.raises(SDMFormatError, match="not an SDM head directory"):
        SDMHead.from_pretrained(tmp_path)
    heads[2][0].save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"sdm_hf_format_version": 1, "x": Infinity}')
    with pytest.raises(SDMFormatError, match="strict JSON"):
        SDMHead.from_pretrained(tmp_path)
    heads[2][0].save_pretrained(tmp_path)
    raw = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(raw[: len(raw) // 2])  # truncated
    with pytest.raises(SDMFormatError, match="model.safetensors"):
        SDMHead.from_pretrained(tmp_path)
    heads[2][0].save_pretrained(tmp_path)
    lines = (tmp_path / "support_documents.jsonl").read_text().splitlines()
    (tmp_path / "support_documents.jsonl").write_text("\n".join(lines[:-1]))
    # the documents load from model.safetensors (the jsonl is a mirror) ...
    assert SDMHead.from_pretrained(tmp_path).support_texts == heads[2][0].support_texts
    # ... and a model.safetensors without the embedded config is refused, whatever the mirrors hold
    _corrupt_tensors(tmp_path, lambda t: None, keep_metadata=False)
    with pytest.raises(SDMFormatError, match="no embedded config"):
        SDMHead.from_pretrained(tmp_path)


def test_failed_save_keeps_previous_head(heads, tmp_path, monkeypatch):
    head = heads[2][0]
    head.save_pretrained(tmp_path / "h")
    before = {p.name: p.read_bytes() for p in (tmp_path / "h").iterdir()}
    import sdm_hf.head.serialization as persistence

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(persistence, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        head.save_pretrained(tmp_path / "h")
    assert {p.name: p.read_bytes() for p in (tmp_path / "h").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h"]  # no staging folder left


def test_model_card_contains_the_numbers(heads, tmp_path):
    head = heads[4][0]
    head.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: sdm_hf" in card
    assert f"| alpha | {head.alpha} |" in card
    assert f"{head.q_min:.4g}" in card
    for c, v in enumerate(head.thresholds.tolist()):
        assert f"c{c}: {v:.4f}" in card
    assert "class-conditionally" in card and "Under distribution shift nothing is guaranteed" in card
    assert "| support set (training exemplars) | 300 |" in card


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c["calibration"].update(q_min=-1), "'q_min' must be >= 0"),
        (lambda c: c["calibration"].update(thresholds=[1.5, 0.2]), r"must lie in \[0, 1\]"),
        (lambda c: c["calibration"].update(alpha=0.8), "Algorithm 1"),
        (lambda c: c["config"].update(input_dim=10**9), "adaptor.weight"),  # refused before any allocation
    ],
)
def test_tampered_configs_are_refused_naming_the_field(small_head, tmp_path, edit, match):
    head, _, _ = small_head
    assert math.isfinite(head.q_min)  # a non-empty region, so alpha and psi are checkable
    head.save_pretrained(tmp_path / "h")
    _edit_config(tmp_path / "h", edit)
    with pytest.raises(SDMFormatError, match=match):
        SDMHead.from_pretrained(tmp_path / "h")


def test_config_of_one_head_beside_the_tensors_of_another_is_refused(small_head, tmp_path):
    head, x, y = small_head
    head.save_pretrained(tmp_path / "a")
    g = torch.Generator().manual_seed(5)
    head.calibrate(x[300:] + 0.05 * torch.randn(x[300:].shape, generator=g), y[300:])  # same sizes, other arrays
    head.save_pretrained(tmp_path / "b")
    (tmp_path / "b" / "config.json").write_bytes((tmp_path / "a" / "config.json").read_bytes())
    with pytest.warns(UserWarning, match="differs from the config stored in"):
        loaded = SDMHead.from_pretrained(tmp_path / "b")  # model.safetensors is one complete save: b
    assert loaded.q_min == head.q_min and torch.equal(loaded.thresholds, head.thresholds)
    # with a's config embedded beside b's tensors, the cross-check catches the mix
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a" / "model.safetensors"), framework="pt") as handle:
        metadata_a = handle.metadata()
    save_file(
        load_file(str(tmp_path / "b" / "model.safetensors")), str(tmp_path / "b" / "model.safetensors"), metadata_a
    )
    with pytest.raises(SDMFormatError, match="do not belong to the same head|does not follow"):
        SDMHead.from_pretrained(tmp_path / "b")


def test_missing_local_paths_say_so_instead_of_asking_the_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        SDMHead.from_pretrained(tmp_path / "not" / "here")
    (tmp_path / "file").write_text("x")
    with pytest.raises(SDMFormatError, match="is a file"):
        SDMHead.from_pretrained(tmp_path / "file")


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_pre_release_formats_are_refused_with_what_to_do(heads, tmp_path, version):
    head, _ = heads[2]
    head.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["sdm_hf_format_version"] == FORMAT_VERSION
    config["sdm_hf_format_version"] = version
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        SDMFormatError, match=f"format version {version} was written by a pre-release sdm_hf.*fit the head again"
    ):
        SDMHead.from_pretrained(tmp_path)


def test_support_predictions_must_follow_from_the_stored_classifier(heads, tmp_path):
    head = heads[4][0]
    head.save_pretrained(tmp_path)
    _corrupt_tensors(tmp_path, lambda t: t.__setitem__("support.predictions", (t["support.predictions"] + 1) % 4))
    with pytest.raises(SDMFormatError, match="support.predictions"):
        SDMHead.from_pretrained(tmp_path)


def test_small_region_guard_is_applied_on_recalibration_and_round_trips(heads, tmp_path):
    head, x = heads[2]
    assert "min_class_points" not in head.config.to_dict()  # off: the file stays as before
    cal = head.calibration
    above = (cal.rescaled_similarity >= cal.q_min) & (cal.q > 0)
    smallest = min(int((above & (cal.labels == c)).sum()) for c in range(2))
    q_min, thresholds = cal.q_min, cal.thresholds.clone()
    head.recalibrate(min_class_points=smallest)  # every class has that many: the region is unchanged
    assert head.q_min == q_min and torch.equal(head.thresholds, thresholds)
    with pytest.warns(UserWarning, match="small-region guard"):  # one class falls short: the region is emptied
        head.recalibrate(min_class_points=smallest + 1)
    assert math.isinf(head.q_min) and not bool(head.predict(x).in_hr.any())
    assert head.calibration_report().diagnosis.advice[0].startswith("the small-region guard")
    head.save_pretrained(tmp_path / "guarded")
    loaded = SDMHead.from_pretrained(tmp_path / "guarded")  # the load check reruns the guarded Algorithm 1
    assert json.loads((tmp_path / "guarded" / "config.json").read_text())["config"]["min_class_points"] == smallest + 1
    assert loaded.config.min_class_points == smallest + 1 and math.isinf(loaded.q_min)
    with pytest.warns(UserWarning):  # the tiers a guarded head reports follow the guard too
        loaded.recalibrate(alpha=0.95)
    loaded.recalibrate(alpha=0.9, min_class_points=0)
    assert loaded.q_min == q_min and torch.equal(loaded.thresholds, thresholds)
    with pytest.raises(ValueError, match="min_class_points must be 'auto' or an integer >= 0"):
        SDMConfig(input_dim=4, min_class_points=-2)
