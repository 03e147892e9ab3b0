"""Every file a request reads comes from one function (run/input_files.py), and no output may replace any
of them (run/outputs.check_outputs): what the CLI, the worker, batch and the bench all refuse alike."""

from __future__ import annotations

import json
import os

import pytest

from phantoms import phantom
from SAM2FewShotLib.common.cache import cache_dir
from SAM2FewShotLib.common.errors import InputError
from SAM2FewShotLib.io.volume_io import write_labels, write_volume
from SAM2FewShotLib.run.input_files import input_files
from SAM2FewShotLib.run.outputs import check_outputs
from SAM2FewShotLib.run.request import Request
from SAM2FewShotLib.run.runner import check_request


@pytest.fixture
def case(tmp_path):
    """A query, and a support case whose labels have a names-and-colours sidecar."""
    image, labels = phantom((6, 16, 16))
    write_volume(image, tmp_path / "q.nrrd")
    write_volume(image, tmp_path / "s.nrrd")
    write_labels(labels, tmp_path / "s_label.nii.gz")
    return tmp_path


def _paths(files, word: str) -> set[str]:
    return {f.path.name for f in files if word in f.what}


def test_a_support_brings_its_sidecar_a_dicom_query_its_files_a_header_its_data(case):
    (case / "dicom").mkdir()
    (case / "dicom" / "IM1.dcm").write_bytes(b"x")
    (case / "h.nhdr").write_text("NRRD0004\ntype: float\ndata file: h.raw.gz\n")
    request = Request(method="registration", query=str(case / "dicom"),
                      supports=((str(case / "h.nhdr"), str(case / "s_label.nii.gz")),))
    files = input_files(request)
    assert _paths(files, "DICOM folder") == {"IM1.dcm"}
    assert _paths(files, "the data file of the support image") == {"h.raw.gz"}
    assert _paths(files, "names-and-colours sidecar of the support labels") == {"s_label.json"}
    assert {f.path.name for f in files if f.given} == {"h.nhdr", "s_label.nii.gz"}


def test_a_library_brings_its_list_its_cases_and_its_index_folders(case):
    (case / "lib").mkdir()
    (case / "lib" / "library.json").write_text(json.dumps({"cases": [["../s.nrrd", "../s_label.nii.gz"]]}))
    files = input_files(Request(method="retrieval", query=str(case / "q.nrrd"), library=str(case / "lib")))
    assert _paths(files, "the list file") == {"library.json"}
    assert _paths(files, "an image of the library") == {"s.nrrd"}
    assert _paths(files, "sidecar of a label file of the library") == {"s_label.json"}
    index = [f.path for f in files if f.folder]
    assert index[0] == case / "lib" / ".sam2fewshot_index" and index[1].is_relative_to(cache_dir())


def test_labels_through_a_symlink_bring_the_sidecars_beside_the_link_and_its_target(case):
    (case / "elsewhere").mkdir()
    (case / "link_label.nii.gz").symlink_to(case / "s_label.nii.gz")
    files = input_files(Request(method="registration", query=str(case / "q.nrrd"),
                                supports=((str(case / "s.nrrd"), str(case / "link_label.nii.gz")),)))
    assert _paths(files, "sidecar") == {"link_label.json", "s_label.json"}


def test_every_front_end_refuses_an_output_on_an_input_file_before_any_work(case):
    """check_request is what the CLI, the worker, batch and the bench run first."""
    supports = ((str(case / "s.nrrd"), str(case / "s_label.nii.gz")),)
    for out, report, words in [
        (case / "s_label.nrrd", None, "the output's names-and-colours sidecar .*s_label.json would replace the "
                                      "names-and-colours sidecar of the support labels"),
        (case / "o.nii.gz", case / "s_label.json", "the report .* would replace the names-and-colours sidecar"),
        (case / "s.nrrd", None, r"also an input of this run \(the support image\)"),
    ]:
        request = Request(method="registration", query=str(case / "q.nrrd"), supports=supports, out=str(out),
                          report=None if report is None else str(report))
        with pytest.raises(InputError, match=words):
            check_request(request)


def test_a_hard_link_of_an_input_is_the_input(case):
    os.link(case / "s_label.json", case / "other.json")
    files = input_files(Request(method="registration", query=str(case / "q.nrrd"),
                                supports=((str(case / "s.nrrd"), str(case / "s_label.nii.gz")),)))
    with pytest.raises(InputError, match="the report .*other.json would replace the names-and-colours sidecar"):
        check_outputs(case / "o.nii.gz", str(case / "other.json"), files)


def test_plain_paths_still_work_as_inputs(case):
    """Callers that pass the request's own paths (as before) are checked by path and by file."""
    with pytest.raises(InputError, match=r"also an input of this run \(an input\)"):
        check_outputs(case / "q.nrrd", None, [str(case / "q.nrrd")])
    assert check_outputs(case / "o.nii.gz", None, [str(case / "q.nrrd")]) == case / "o_report.json"
