"""Volumes as clinics have them (issue 13), every method: thin stacks and supports stored in another plane.

A thin stack (a cine short-axis or thick-slice series: a few slices of 8 mm, fine in plane) is made
from real msd_hippocampus cases by resampling their slice axis to 8 mm, in-plane unchanged. Every
method (propagate, matched-support, retrieval, registration, guided) segments it through the real
CLI with the real SAM2 architecture and random weights at 128 px: it finishes, its output lies on
the query's exact grid, its report names the method and every structure, and it holds only the
label values it was given. A support with fewer labelled slices than --slices-per-structure works,
and a support stored in another plane (the same physical content, its array transposed and its
direction changed to match) gives matched support the very result the original gives, and
registration and guided one within a fraction of a slice of it.
The 4D, vector and header cases are in test_clinical_shapes.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SAM2FewShotLib.cli.main import main
from SAM2FewShotLib.io.volume import LabelMap, Volume
from SAM2FewShotLib.io.volume_io import (
    read_labels,
    read_volume,
    write_labels,
    write_volume,
)

# runs compare bit for bit
RANDOM = ["--random-weights", "--image-size", "128", "--device", "cpu", "--threads", "1", "-q"]
FAST = ["--augmentations", "1", "--slices-per-structure", "2"]  # matched-support and guided, for speed
THIN_MM = 8.0
CASES = ("015", "184", "195")  # the query, the support, and a second library case


def thin_stack(path: Path, linear: bool) -> sitk.Image:
    """The file resampled to THIN_MM along its slice axis (k), in-plane untouched: a thick-slice series."""
    image = sitk.ReadImage(str(path))
    spacing, size = list(image.GetSpacing()), list(image.GetSize())
    size[2] = int((size[2] - 1) * spacing[2] // THIN_MM) + 1
    spacing[2] = THIN_MM
    return sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear if linear else sitk.sitkNearestNeighbor,
                         image.GetOrigin(), spacing, image.GetDirection(), 0.0, image.GetPixelID())


def other_plane(volume: Volume) -> Volume:
    """The same voxels stored with K along the first in-plane axis: an acquisition in another plane."""
    d, (si, sj, sk) = volume.direction_matrix, volume.spacing
    return Volume(np.ascontiguousarray(np.transpose(volume.array, (2, 0, 1))), (sj, sk, si), volume.origin,
                  tuple(np.stack([d[:, 1], d[:, 2], d[:, 0]], 1).ravel()))


@pytest.fixture(scope="module")
def thin(tmp_path_factory, shared_data):
    """Thin stacks of three cases, a prompt file on the query, a library of the other two, the support
    stored in another plane, and a cache of CLI runs the tests share."""
    d = tmp_path_factory.mktemp("thin")
    (d / "library").mkdir()
    for case in CASES:
        source = shared_data / "msd_hippocampus" / f"hippocampus_{case}"
        for kind, linear in (("img", True), ("label", False)):
            stack = thin_stack(Path(f"{source}_{kind}.nii.gz"), linear)
            sitk.WriteImage(stack, str(d / f"h{case}_{kind}.nii.gz"))
            if case != "015":
                sitk.WriteImage(stack, str(d / "library" / f"h{case}_{kind}.nii.gz"))
    truth = read_labels(d / "h015_label.nii.gz")
    labelled = int(np.argmax([np.count_nonzero(s) for s in truth.volume.array]))  # the slice axis is k
    prompt = np.zeros_like(truth.volume.array)
    prompt[labelled] = truth.volume.array[labelled]
    write_labels(truth.with_array(prompt), d / "prompt.nii.gz")
    image, labels = read_volume(d / "h184_img.nii.gz"), read_labels(d / "h184_label.nii.gz")
    write_volume(other_plane(image), d / "h184s_img.nii.gz")  # the support, stored sagittally
    write_labels(LabelMap(other_plane(labels.volume), labels.segments), d / "h184s_label.nii.gz")
    assert other_plane(image).shape_ijk != image.shape_ijk  # really stored otherwise
    return {"dir": d, "runs": {}}


def support(d: Path, case: str = "184") -> list[str]:
    return ["--support", str(d / f"h{case}_img.nii.gz"), str(d / f"h{case}_label.nii.gz")]


def conditioning(method: str, d: Path, case: str = "184") -> list[str]:
    """The options that condition ``method`` on the thin query: its prompts, supports or library."""
    if method == "propagate":
        return ["--prompt-labels", str(d / "prompt.nii.gz")]
    if method == "retrieval":
        return ["--library", str(d / "library")]
    fast = FAST if method in ("matched-support", "guided") else []
    return [*support(d, case), "--method", method, *fast]


def segment(thin, name: str, argv: list[str]) -> tuple[Path, dict]:
    """One CLI run on the thin query (once per name in a module): its output file and report."""
    if name not in thin["runs"]:
        d = thin["dir"]
        out = d / f"{name}.nii.gz"
        code = main(["segment", "--query", str(d / "h015_img.nii.gz"), "--out", str(out), *argv, *RANDOM])
        assert code == 0, name
        thin["runs"][name] = out, json.loads((d / f"{name}_report.json").read_text())
    return thin["runs"][name]


def assert_on_query_grid(out: Path, query: Path) -> np.ndarray:
    """The output's geometry is the query file's, exactly; returns its voxels."""
    result, source = sitk.ReadImage(str(out)), sitk.ReadImage(str(query))
    assert result.GetSize() == source.GetSize()
    for what in ("GetSpacing", "GetOrigin", "GetDirection"):
        assert np.allclose(getattr(result, what)(), getattr(source, what)(), atol=1e-6), what
    return sitk.GetArrayFromImage(result)


def given_labels(method: str, d: Path) -> tuple[set, set]:
    """(label values, structure names) the method was given to transfer."""
    files = {"propagate": [d / "prompt.nii.gz"], "retrieval": sorted((d / "library").glob("*_label.nii.gz"))}
    labels = [read_labels(f) for f in files.get(method, [d / "h184_label.nii.gz"])]
    return ({v for lab in labels for v in np.unique(lab.volume.array).tolist()},
            {s.name for lab in labels for s in lab.segments})


@pytest.mark.parametrize("method", ["propagate", "matched-support", "retrieval", "registration", "guided"])
def test_every_method_segments_a_thin_stack_on_its_exact_grid(thin, method):
    d = thin["dir"]
    assert sitk.ReadImage(str(d / "h015_img.nii.gz")).GetSize()[2] <= 5  # a thin stack: a few 8 mm slices
    out, report = segment(thin, method, conditioning(method, d))
    array = assert_on_query_grid(out, d / "h015_img.nii.gz")
    values, names = given_labels(method, d)
    assert set(np.unique(array).tolist()) <= values
    assert report["method"] == method
    assert {s["name"] for s in report["segments"]} == names
    assert {s["name"] for s in report["structures"]} == names
    assert {s.name for s in read_labels(out).segments} == names  # the sidecar names them too


def test_a_support_with_fewer_labelled_slices_than_asked_gives_what_it_has(thin):
    d = thin["dir"]
    labels = read_labels(d / "h184_label.nii.gz").volume.array
    per_structure = {v: int(np.count_nonzero([np.any(s == v) for s in labels])) for v in (1, 2)}
    asked = max(per_structure.values()) + 3
    out, report = segment(thin, "few-slices", [*support(d), "--augmentations", "1", "--slices-per-structure",
                                               str(asked)])
    assert report["fewshot"]["support_entries"] == sum(per_structure.values())  # every labelled slice, once
    assert set(np.unique(assert_on_query_grid(out, d / "h015_img.nii.gz")).tolist()) <= {0, 1, 2}


@pytest.mark.parametrize("method", ["matched-support", "registration", "guided"])
def test_a_support_stored_in_another_plane_gives_the_result_the_original_gives(thin, method):
    d = thin["dir"]
    original, _ = segment(thin, method, conditioning(method, d))
    out, report = segment(thin, f"{method}-sagittal", conditioning(method, d, case="184s"))
    array = assert_on_query_grid(out, d / "h015_img.nii.gz")
    assert report["method"] == method and set(np.unique(array).tolist()) <= {0, 1, 2}
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(original)))
    if method == "matched-support":  # an axis swap is a view (io/reorient.py): the very same support slices
        assert np.array_equal(array, reference)
        return
    # Registration's optimiser takes a slightly different path on the permuted grid (measured: 0.5 mm of
    # translation); a support misread in the wrong plane would land tens of mm away or nowhere.
    spacing = np.array(sitk.ReadImage(str(original)).GetSpacing())[::-1]
    for value in (1, 2):
        a, b = np.argwhere(reference == value), np.argwhere(array == value)
        assert len(a) and len(b), value
        assert np.linalg.norm((a.mean(0) - b.mean(0)) * spacing) < THIN_MM / 3, value
