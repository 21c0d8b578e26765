"""Output folders: --overwrite never deletes a command's own inputs, files sdm_hf did not write,
or the old results when the new ones cannot be written."""

import errno
import json
import os

import pytest

from sdm_hf.utils.output_dir import (
    MARKER,
    check_output_dir,
    prepare_output_dir,
    replacing_output_dir,
    seal_output_dir,
    unseal_output_dir,
)


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


def _sealed(tmp_path, name="out"):
    with replacing_output_dir(tmp_path / name, overwrite=False, program="test") as folder:
        (folder / "result.json").write_text("{}")
        (folder / "sub").mkdir()
        (folder / "sub" / "weights.bin").write_bytes(b"old")
    return tmp_path / name


def test_a_file_the_user_added_stops_overwrite_and_is_kept(tmp_path):
    out = _sealed(tmp_path)
    marker = json.loads((out / MARKER).read_text())
    assert marker["files"] == ["result.json", "sub/weights.bin"]
    (out / "my_notes.txt").write_text("mine")
    for attempt in (
        lambda: prepare_output_dir(out, overwrite=True),
        lambda: replacing_output_dir(out, overwrite=True).__enter__(),
    ):
        with pytest.raises(FileExistsError, match=r"files sdm_hf did not write \(my_notes.txt\)"):
            attempt()
        assert (out / "my_notes.txt").read_text() == "mine" and (out / "result.json").is_file()
    (out / "my_notes.txt").unlink()
    with replacing_output_dir(out, overwrite=True) as folder:
        (folder / "new.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "new.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or old copy left beside it


def test_a_failed_write_leaves_the_old_folder_as_it_was(tmp_path):
    out = _sealed(tmp_path)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(OSError, match="No space left"):
        with replacing_output_dir(out, overwrite=True) as folder:
            (folder / "result.json").write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C too
        with replacing_output_dir(out, overwrite=True):
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "sub" / "weights.bin").read_bytes() == b"old"


def test_a_run_killed_during_the_swap_is_repaired(tmp_path):
    out = _sealed(tmp_path)
    # killed between the two renames: the old folder sits beside, the target is missing
    os.replace(out, tmp_path / ".out.sdm_hf-old-0123abcd")
    (tmp_path / ".out.sdm_hf-new-89abcdef").mkdir()  # and a staging folder of a killed run
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        with replacing_output_dir(out, overwrite=False):
            pass
    assert (out / "sub" / "weights.bin").read_bytes() == b"old"  # put back before the check
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_unsealed_and_resumed_folders(tmp_path):
    out = prepare_output_dir(tmp_path / "run", overwrite=False)  # a run writing in place
    (out / "part.json").write_text("{}")
    assert check_output_dir(out, overwrite=True) == out  # unsealed: everything in it is the run's
    seal_output_dir(out)
    (out / "notes.md").write_text("mine")
    unseal_output_dir(out)  # resumed: what the run adds is ours, the note stays foreign
    (out / "part2.json").write_text("{}")
    with pytest.raises(FileExistsError, match="notes.md"):
        check_output_dir(out, overwrite=True)
    seal_output_dir(out)
    assert json.loads((out / MARKER).read_text())["files"] == ["part.json", "part2.json"]
    with pytest.raises(FileExistsError, match="notes.md"):
        prepare_output_dir(out, overwrite=True)
