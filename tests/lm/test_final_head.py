"""The rows of the test-time head: the papers' mix, or calibration on the model's own generations."""

from types import SimpleNamespace

import pytest

from sdm_hf.lm.control import ControlTokens
from sdm_hf.lm.final_head import FINAL_HEAD_SOURCES, final_head_rows

CONTROL = ControlTokens()


def _docs(n):
    return [
        SimpleNamespace(
            id=i,
            prompt=f"p{i}",
            positive=CONTROL.add(f"right {i}", True),
            negatives=[CONTROL.add(f"static {i}", False)],
        )
        for i in range(n)
    ]


def _encode(doc, text, positive):
    return {"doc": doc.id, "text": text, "reward": bool(positive)}


def _same(gold, content):
    return gold == content


def _rows(docs, generations, calibration, **kw):
    return final_head_rows(docs, [], generations, calibration, 7, CONTROL, _same, _encode, **kw)


def test_mixed_rows_are_every_positive_static_and_wrong_generation():
    docs = _docs(6)
    generations = [CONTROL.add(f"right {i}", True) if i % 2 else CONTROL.add(f"wrong {i}", True) for i in range(6)]
    rows, mask, generated = _rows(docs, generations, "mixed")
    assert mask is None and generated == 3  # the three wrong generations join as negatives (suffix No)
    assert [r["document_id"] for r in rows] == list(range(len(rows))) and len(rows) == 6 * 2 + 3
    assert {r["text"] for r in rows if not r["reward"]} >= {
        CONTROL.add("wrong 0", False),
        CONTROL.add("static 5", False),
    }
    assert not any(r["text"] == CONTROL.add("right 1", False) for r in rows)  # a right answer is never a negative
    rows, _, generated = _rows(docs, generations, "mixed", wrong_as_negatives=False)
    assert generated == 0 and len(rows) == 12


def test_generations_calibrate_on_half_of_the_prompts_labelled_by_the_verifier():
    docs = _docs(20)
    generations = [CONTROL.add(f"right {i}" if i % 2 == 0 else f"wrong {i}", True) for i in range(20)]
    rows, mask, _ = _rows(docs, generations, "generations")
    calibrating = [r for r, m in zip(rows, mask.tolist()) if m]
    assert len(calibrating) == 10 and len({r["doc"] for r in calibrating}) == 10
    for r in calibrating:  # the model's own answer, its suffix set by the verifier's label
        right = r["doc"] % 2 == 0
        assert r["reward"] == right and r["text"] == CONTROL.add(f"{'right' if right else 'wrong'} {r['doc']}", right)
    training_docs = {r["doc"] for r, m in zip(rows, mask.tolist()) if not m}
    assert training_docs.isdisjoint({r["doc"] for r in calibrating})  # no prompt on both sides
    again, mask_again, _ = _rows(docs, generations, "generations")
    assert again == rows and mask_again.tolist() == mask.tolist()  # seeded


def test_generations_calibration_refuses_one_sided_or_missing_generations():
    docs = _docs(8)
    with pytest.raises(ValueError, match="at least 2 of each"):
        _rows(docs, [d.positive for d in docs], "generations")  # all right
    with pytest.raises(ValueError, match="needs the model's generations"):
        _rows(docs, None, "generations")
    with pytest.raises(ValueError, match="'mixed' or 'generations'"):
        _rows(docs, None, "both")
    assert set(FINAL_HEAD_SOURCES) == {"mixed", "generations"}
