"""Output folders: a command never replaces a folder that holds its own inputs."""

import pytest

from sdm_hf.output_dir import MARKER, check_output_dir, prepare_output_dir


def test_an_input_inside_the_output_folder_is_refused_and_kept(tmp_path):
    out = prepare_output_dir(tmp_path / "outA", overwrite=False)
    data = out / "my_train.jsonl"
    data.write_text('{"text": "x", "label": 0}\n')
    for inputs in ([data], [out], [tmp_path / "elsewhere.jsonl", data]):
        with pytest.raises(FileExistsError, match="is an input of this command"):
            prepare_output_dir(out, overwrite=True, inputs=inputs)
        assert data.read_text() == '{"text": "x", "label": 0}\n'  # nothing deleted
    with pytest.raises(FileExistsError, match="is an input of this command"):
        check_output_dir(out, overwrite=True, inputs=[str(data)])


def test_inputs_elsewhere_and_hub_ids_do_not_block(tmp_path):
    out = prepare_output_dir(tmp_path / "out", overwrite=False)
    (out / "old.txt").write_text("old")
    sibling = tmp_path / "out-data.jsonl"  # a name that starts like the folder but is not in it
    sibling.write_text("{}\n")
    again = prepare_output_dir(out, overwrite=True, inputs=[sibling, "user/some-hub-model"])
    assert sorted(p.name for p in again.iterdir()) == [MARKER] and sibling.exists()
