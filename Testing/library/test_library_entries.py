"""Malformed library entries give one line, a damaged index is rebuilt without a traceback, and warnings
repeated per segment or per case are summarised in one line (issue 26, items 6 and 7)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from SAM2FewShotLib.common.errors import InputError
from SAM2FewShotLib.common.warnings_summary import RepeatedWarnings, summary_line
from SAM2FewShotLib.io.volume import LabelMap, Segment, Volume
from SAM2FewShotLib.io.volume_io import read_labels, write_labels, write_volume
from SAM2FewShotLib.library.cases import find_cases, open_library
from SAM2FewShotLib.library.index import MANIFEST, EmbeddingIndex, IndexConfig, merge_segments

CONFIG = IndexConfig("intensity", "axial", {"mode": "auto"})


@pytest.fixture
def case(tmp_path: Path) -> tuple[str, str]:
    volume = Volume(np.arange(4 * 6 * 6, dtype=np.float32).reshape(4, 6, 6), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    labels = np.zeros((4, 6, 6), np.uint8)
    labels[1:3, 2:4, 2:4] = 1
    write_volume(volume, tmp_path / "a.nrrd")
    segments = (Segment(1, "liver", (1.0, 0.0, 0.0)),)
    write_labels(LabelMap(volume.with_array(labels), segments), tmp_path / "a_label.nrrd")
    return str(tmp_path / "a.nrrd"), str(tmp_path / "a_label.nrrd")


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("cases, words", [
    ([5], "case 1: expected"),
    (["a.nrrd"], "case 1: expected"),
    ([["a.nrrd"]], "case 1: expected"),
    ([{"image": "a.nrrd"}], "case 1: the entry has no 'labels'"),
    ([{"labels": "a_label.nrrd"}], "case 1: the entry has no 'image'"),
    ([{"image": 7, "labels": "a_label.nrrd"}], "'image' must be a file path"),
    ([{"image": "a.nrrd", "labels": None}], "'labels' must be a file path"),
    ([{"image": "a.nrrd", "labels": ""}], "'labels' must be a file path"),
    ([{"image": "a.nrrd", "labels": "a_label.nrrd"}, {"image": "a.nrrd", "labels": ["x"]}], "case 2"),
    ([{"image": "a\ud800.nrrd", "labels": "a_label.nrrd"}], "not a usable file name"),
    ([{"image": "a" * 5000 + ".nrrd", "labels": "a_label.nrrd"}], "not a usable file name (File name too long)"),
    ([{"image": "a\u0000.nrrd", "labels": "a_label.nrrd"}], "not a usable file name"),
    ("not a list", "expected a list of cases"),
    ({"a": 1}, "expected a list of cases"),
])
def test_a_malformed_list_entry_is_one_line_naming_the_file_and_the_entry(tmp_path, case, cases, words):
    listing = tmp_path / "library.json"
    listing.write_text(json.dumps({"cases": cases}))
    with pytest.raises(InputError) as refused:
        open_library(listing)
    message = str(refused.value)
    assert "\n" not in message and str(listing) in message and words in message, message


def test_a_list_file_that_is_not_json_is_one_line(tmp_path):
    (tmp_path / "library.json").write_text("{not json")
    with pytest.raises(InputError, match="cannot read library list .*library.json: Expecting"):
        open_library(tmp_path)


def test_good_entries_in_both_forms_still_open(tmp_path, case):
    (tmp_path / "library.json").write_text(json.dumps({"cases": [{"image": "a.nrrd", "labels": "a_label.nrrd"}]}))
    assert [c.id for c in open_library(tmp_path).cases] == ["a_label.nrrd"]
    (tmp_path / "pairs.json").write_text(json.dumps([list(case)]))
    assert len(open_library(tmp_path / "pairs.json")) == 1


@pytest.mark.parametrize("damage", [
    lambda e: e.update(segments=[5]),
    lambda e: e.update(segments=[{"value": 1, "name": "x"}]),
    lambda e: e.update(segments=[{"value": "1", "name": "x", "color": [1, 0, 0]}]),
    lambda e: e.update(shards={"emb": "x", "rows": {}}),
    lambda e: e["shards"]["emb"].update(file="../../../etc/passwd"),
    lambda e: e.update(embeddings=True),
])
def test_a_damaged_index_entry_is_rebuilt_with_one_warning_never_a_traceback(tmp_path, damage, caplog):
    index = EmbeddingIndex(tmp_path, CONFIG)
    shard = {"file": "abc.emb.npy", "size": 1, "mtime_ns": 1, "sha256": "0"}
    entry = {"content": "abc", "embeddings": 1, "dim": 2, "rows": 1, "num_slices": 4,
             "segments": [{"value": 1, "name": "liver", "color": [1, 0, 0], "terminology": None}],
             "shards": {"emb": dict(shard), "rows": dict(shard, file="abc.rows.npy")}}
    damage(entry)
    index.folder.mkdir(parents=True)
    index.manifest_path.write_text(json.dumps({"format": 1, "config": CONFIG.as_dict(), "files": {},
                                               "cases": {"a_label.nrrd": entry}}))
    assert index.read_manifest()["cases"] == {}
    assert index.describe([])["cases_indexed"] == 0 and len(index.load()) == 0
    assert all("damaged" in line for line in _warnings(caplog)) and _warnings(caplog)
    assert (tmp_path / CONFIG.id / MANIFEST).is_file()


def test_300_conflicting_segment_names_are_one_warning_line(caplog):
    first = [{"value": v, "name": f"organ {v}", "color": [1, 0, 0]} for v in range(1, 301)]
    second = [{"value": v, "name": f"Organ {v}", "color": [0, 1, 0]} for v in range(1, 301)]
    merged = merge_segments([first, second])
    assert merged[7].name == "organ 7"
    [line] = _warnings(caplog)
    assert "(300 times)" in line and "1 'organ 1'/'Organ 1'" in line and "and 297 more" in line


def test_names_shared_by_many_values_are_one_warning_line(caplog):
    same = [{"value": v, "name": "Segment", "color": [1, 0, 0]} for v in range(1, 51)]
    merged = merge_segments([same])
    assert merged[2].name == "Segment_2"
    [line] = _warnings(caplog)
    assert "(49 times)" in line and "renamed" in line


def test_repeated_names_in_one_label_file_are_one_warning_line(tmp_path, caplog):
    volume = Volume(np.zeros((2, 4, 4), np.uint8), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    array = volume.array.copy()
    array[0, 0, :] = [1, 2, 3, 4]
    segments = [{"value": v, "name": "Segment", "color": [1, 0, 0]} for v in range(1, 5)]
    write_volume(volume.with_array(array), tmp_path / "l.nii.gz")
    (tmp_path / "l.json").write_text(json.dumps({"segments": segments}))
    names = [s.name for s in read_labels(tmp_path / "l.nii.gz").segments]
    assert names == ["Segment", "Segment_2", "Segment_3", "Segment_4"]
    [line] = _warnings(caplog)
    assert "(3 times)" in line


def test_label_files_without_images_are_one_warning_line(tmp_path, case, caplog):
    for n in range(20):
        (tmp_path / f"orphan{n:02d}_label.nrrd").write_bytes(Path(case[1]).read_bytes())
    assert [c.id for c in find_cases(tmp_path)] == ["a_label.nrrd"]
    [line] = _warnings(caplog)
    assert "(20 times)" in line and "orphan00_label.nrrd" in line


def test_one_occurrence_keeps_its_full_message():
    assert summary_line("kind", ["a"], "the whole message") == "the whole message"
    assert summary_line("kind", list("abcde"), "x", shown=2) == "kind (5 times): a, b and 3 more"
    log = logging.getLogger("test_summary")
    with RepeatedWarnings(log) as warnings:
        warnings.add("kind", "a", "only a")
    assert warnings._kinds == {}
