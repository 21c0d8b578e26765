"""sdm_hf.lm.state: the checkpointed SDM epoch state round-trips through strict JSON, and a
damaged or newer file is refused with its name and the problem."""

import json

import pytest
import torch

from sdm_hf.lm.state import STATE_FORMAT, STATE_NAME, SDMEpochState


def a_state():
    return SDMEpochState(
        prepared_epoch=2,
        versions=[(0, "a<verified>Yes</verified>", True), (1, "b<verified>No</verified>", False)],
        hard_negatives={1: ["c<verified>No</verified>"]},
        previous_hard_negatives={0: ["d<verified>No</verified>", "e<verified>No</verified>"]},
        support_row=torch.tensor([-1, 0]),
    )


def test_round_trip_is_exact_and_strict_json():
    state = a_state()
    text = state.to_json()
    data = json.loads(text)
    assert data["format"] == STATE_FORMAT and list(data["hard_negatives"]) == ["1"]
    back = SDMEpochState.from_json(text)
    assert (back.prepared_epoch, back.versions) == (state.prepared_epoch, state.versions)
    assert back.hard_negatives == state.hard_negatives
    assert back.previous_hard_negatives == state.previous_hard_negatives
    assert back.support_row.dtype == torch.long and back.support_row.tolist() == [-1, 0]
    empty = SDMEpochState.from_json(SDMEpochState().to_json())
    assert empty.prepared_epoch is None and empty.support_row is None and empty.versions == []


def _with(**changes):
    data = json.loads(a_state().to_json())
    data.update(changes)
    return json.dumps(data)


@pytest.mark.parametrize(
    "text, problem",
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "JSON object"),
        ('{"format": 1}', "missing fields"),
        (_with(format=STATE_FORMAT + 1), "newer than this sdm_hf reads"),
        (_with(format="1"), "format must be an integer"),
        (_with(prepared_epoch=-1), "prepared_epoch"),
        (_with(versions=[[0, "a", 1]]), "versions"),
        (_with(versions=[[-3, "a", True]]), "versions"),
        (_with(hard_negatives={"x": ["a"]}), "hard_negatives"),
        (_with(previous_hard_negatives={"0": "a"}), "previous_hard_negatives"),
        (_with(support_row=[0, -2]), "support_row"),
        (_with().replace('"prepared_epoch": 2', '"prepared_epoch": NaN'), "NaN"),
    ],
)
def test_bad_files_name_the_file_and_the_problem(text, problem):
    with pytest.raises(ValueError, match=problem) as caught:
        SDMEpochState.from_json(text, source=f"ckpt/{STATE_NAME}")
    assert str(caught.value).startswith(f"ckpt/{STATE_NAME}: ")
