"""The Slicer panel's Qt-free helpers: methods, jobs, low-confidence slices, refine prompts, geometry."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from phantoms import OBLIQUE, phantom
from SAM2FewShotLib.common.errors import InputError
from SAM2FewShotLib.methods.registry import METHODS
from SAM2FewShotLib.run import protocol, reports
from SAM2FewShotLib.sam2.models import get_spec
from SAM2FewShotLib.slicer import panel
from SAM2FewShotLib.slicer.panel import PanelChoices

ENGINE = Path(protocol.__file__).resolve().parents[1]  # the engine package


# --- methods and the panel's choices --------------------------------------------------------------


def test_a_method_is_offered_exactly_when_the_worker_runs_it_and_the_engine_has_it():
    status = panel.method_availability()
    assert [m.key for m in METHODS.values()] == ["propagate", "matched-support", "retrieval", "registration",
                                                        "guided"]
    for method in METHODS.values():
        has_it = (method.key in protocol.METHODS
                  and (ENGINE / "methods" / f"{method.key.replace('-', '_')}.py").is_file())
        assert (status[method.key] is None) == has_it, method.key
        if not has_it:
            assert "not available" in status[method.key].lower()
    assert status["propagate"] is None and status["matched-support"] is None
    assert panel.method_availability(worker_methods=("propagate",))["matched-support"] is not None


def test_panel_choices_are_the_engines_own():
    from SAM2FewShotLib.io.normalization import Normalization
    from SAM2FewShotLib.io.slicing import ANATOMICAL_AXES, slicing_axis
    from SAM2FewShotLib.support.memory import SCHEMES

    assert panel.SCHEMES == SCHEMES
    assert set(panel.AXES) == {"auto", *ANATOMICAL_AXES}
    image, _ = phantom()
    assert {slicing_axis(image, a) for a in panel.AXES} <= {0, 1, 2}
    for text in panel.NORMALIZATIONS:
        Normalization.parse(text)  # every offered preset is one the engine understands


def test_remembered_settings_come_back_typed_and_messages_read_as_sentences():
    import enum

    class Colour(enum.Enum):
        red = "red"

    assert panel.remembered_value("true", False) is True and panel.remembered_value("false", True) is False
    assert panel.remembered_value(True, False) is True  # Qt may hand back a bool
    assert panel.remembered_value("7", 3) == 7 and panel.remembered_value("red", Colour.red) is Colour.red
    assert panel.remembered_value("/data", "") == "/data"
    for bad, current in (("x", 3), ("blue", Colour.red)):
        with pytest.raises(ValueError):
            panel.remembered_value(bad, current)
    assert panel.panel_message("select the query volume to segment") == "Select the query volume to segment."
    assert panel.panel_message("Done.") == "Done." and panel.panel_message("") == ""


@pytest.mark.parametrize("make_error", [
    lambda: weights_module().ModelError("weights for sam2.1-tiny are not in the cache and cannot be downloaded "
                                        "(offline): use --checkpoint FILE or sam2fewshot models import "
                                        "sam2.1-tiny FILE"),
    lambda: weights_module()._network_error(get_spec("sam2.1-tiny"), TimeoutError("timed out")),
    lambda: prompt_plane_error(),
    lambda: InputError("invalid job: a retrieval job needs 'library'"),
], ids=["offline", "download", "planes", "protocol"])
def test_messages_in_the_panel_name_its_controls_not_cli_options(make_error):
    message = panel.panel_message(str(make_error()))
    assert "sam2fewshot" not in message and "--" not in message and "invalid job" not in message, message
    assert message[0].isupper() and message.endswith(".")


def weights_module():
    from SAM2FewShotLib.sam2 import weights

    return weights


def prompt_plane_error() -> InputError:
    from SAM2FewShotLib.io.slicing import prompt_plane

    image, truth = phantom((16, 16, 16), spacing=(1.0, 1.0, 1.0))
    both = np.zeros_like(truth.volume.array)
    both[:, :, [6, 10]] = truth.volume.array[:, :, [6, 10]]
    both[8] = truth.volume.array[8]
    with pytest.raises(InputError) as caught:
        prompt_plane(image, both)
    return caught.value


def test_the_library_is_scanned_off_the_calling_thread(shared_data, tmp_path):
    import threading

    scan = panel.LibraryScan(str(shared_data / "msd_hippocampus"))
    assert scan.wait(timeout=60) == "5 labelled case(s)" and scan.done
    assert scan.thread_id is not None and scan.thread_id != threading.get_ident()
    assert "no labelled case" in panel.LibraryScan(str(tmp_path)).wait(timeout=60)


def test_jobs_from_the_panel_pass_the_workers_own_validation(tmp_path):
    from SAM2FewShotLib.methods.matched_support import FewShotParams
    from SAM2FewShotLib.run.runner import check_request

    choices = PanelChoices(method="matched-support", device="cpu", random_weights=True, image_size=256, top_k=2,
                           augmentations=3, scheme="pair", axis="coronal", normalization="lung", slice_range=(2, 5))
    job = panel.build_job("j1", choices, tmp_path, tmp_path / "q.nrrd",
                                   supports=[(tmp_path / "s.nrrd", tmp_path / "s.seg.nrrd")])
    parsed = protocol.parse_request(protocol.encode(job.to_message()))
    assert parsed == job
    assert parsed.out == str(tmp_path / "result.nrrd") and parsed.report == str(tmp_path / "report.json")
    assert parsed.model.random_weights and parsed.model.image_size == 256 and parsed.frames.slice_range == (2, 5)
    assert parsed.model.precision is None  # "default": each device's own, as the CLI without --precision
    fast = panel.build_job("j4", dataclasses.replace(choices, precision="auto"), tmp_path, tmp_path / "q.nrrd",
                           supports=[(tmp_path / "s.nrrd", tmp_path / "s.seg.nrrd")])
    assert protocol.parse_request(protocol.encode(fast.to_message())).model.precision == "auto"
    assert panel.PANEL_PRECISIONS == ("default", "fp32", "bf16", "auto")
    for name in ("q.nrrd", "s.nrrd", "s.seg.nrrd", "p.seg.nrrd"):
        (tmp_path / name).write_bytes(b"")  # the runner's checks look for the files, not into them
    spec, params = check_request(parsed)  # what the worker's runner checks before it loads anything
    assert spec.key == "matched-support" and isinstance(params, FewShotParams)
    assert (params.scheme, params.top_k, params.augmentations) == ("pair", 2, 3)
    propagate = panel.build_job("j2", PanelChoices(), tmp_path, tmp_path / "q.nrrd", tmp_path / "p.seg.nrrd")
    assert protocol.parse_request(protocol.encode(propagate.to_message())).params == {}
    check_request(propagate)
    with pytest.raises(InputError, match="propagate needs prompts"):  # refused by the worker before any work
        check_request(protocol.parse_request(protocol.encode(panel.build_job("j3", PanelChoices(), tmp_path,
                                                                             tmp_path / "q.nrrd").to_message())))


# --- the report's low-confidence slices -----------------------------------------------------------


@pytest.fixture(scope="module")
def real_report(random_predictor):
    """A propagate run's report from the real sam2 architecture (random weights): real object scores."""
    from SAM2FewShotLib.io.volume import LabelMap
    from SAM2FewShotLib.methods.propagate import prompts_from_labels, segment_propagate
    from SAM2FewShotLib.sam2.session import VolumeSession

    image, truth = phantom((8, 32, 32), spacing=(1.0, 1.0, 3.0))
    prompt = np.zeros_like(truth.volume.array)
    prompt[4] = truth.volume.array[4]
    session = VolumeSession(random_predictor, image)
    prompts = prompts_from_labels(session, LabelMap(truth.volume.with_array(prompt), truth.segments))
    return segment_propagate(session, prompts, truth.segments)[1]


def test_low_confidence_slices_are_the_undecided_ones_most_doubtful_first(real_report):
    every = reports.low_confidence_slices(real_report, margin=float("inf"))
    flags = reports.low_confidence_slices(real_report, margin=2.0)
    expected = {(s["slice"], name) for s in real_report["slices"] for name, o in s["objects"].items()
                if o["object_score"] is not None and abs(o["object_score"]) < 2.0 and not o["source"].endswith("prompt")
                and o["source"] != "not visited"}
    assert {(f.slice, f.segment) for f in flags} == expected
    assert all(f.slice != 4 for f in every)  # the prompted slice is the user's own mask, never flagged
    assert len(every) == 2 * 7  # two structures on the 7 propagated slices
    scores = [abs(f.score) for f in every]
    assert scores == sorted(scores)
    assert all(0.0 < f.confidence < 1.0 and (f.confidence > 0.5) == (f.score > 0) for f in every)
    assert len(reports.low_confidence_slices(real_report, margin=float("inf"), limit=3)) == 3
    assert reports.report_axis(real_report) == 0


def test_a_report_without_an_axis_is_refused():
    with pytest.raises(InputError):
        reports.report_axis({"session": {}})


# --- refine: edited slices -------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_edited_slices_are_found_along_the_run_axis_from_digests_alone(axis):
    _, truth = phantom((10, 24, 28))
    previous = truth.volume.array == 1
    digests = panel.slice_digests(previous, axis)  # what a result keeps: 16 bytes a slice
    assert len(digests) == previous.shape[axis] and all(len(d) == 16 for d in digests)
    current = previous.copy()
    view = np.moveaxis(current, axis, 0)
    mid = int(np.argmax(view.sum(axis=(1, 2))))  # the slice with the most labelled voxels
    assert mid > 2
    view[2] = False
    view[2, 3:6, 4:9] = True  # a slice redrawn
    view[mid, view[mid].nonzero()[0][0]] = False  # one row erased
    assert panel.changed_slices(current, digests, axis) == [2, mid]
    assert panel.changed_slices(previous, digests, axis) == []


def test_edits_must_be_on_the_grid_of_the_last_result():
    _, truth = phantom((10, 24, 28))
    previous = truth.volume.array > 0
    with pytest.raises(InputError, match="5 slices where the last result had 10"):
        panel.changed_slices(previous[:5], panel.slice_digests(previous, 0), 0)
    # the same count of slices on another in-plane grid: every slice differs, never a false "unchanged"
    assert panel.changed_slices(previous[:, :20], panel.slice_digests(previous, 0), 0) == list(range(10))
    assert panel.format_slices(list(range(3))) == "0, 1, 2"
    assert panel.format_slices(list(range(20)), limit=2) == "0, 1, ... (20 slices)"


# --- geometry and wording -------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slice_centre_lands_on_that_slice_in_world_coordinates(axis):
    image, _ = phantom((10, 24, 28), direction=OBLIQUE)
    ras = panel.slice_center_ras(image.ijk_to_ras(), image.array.shape, axis, 7)
    ijk = np.linalg.inv(image.ijk_to_ras()) @ np.array([*ras, 1.0])
    kji = ijk[2::-1]
    assert kji[axis] == pytest.approx(7.0)
    others = [d for d in range(3) if d != axis]
    assert kji[others] == pytest.approx([(image.array.shape[d] - 1) / 2 for d in others])


def test_progress_and_elapsed_wording():
    assert panel.progress_text("propagate forward", 12, 80) == "Propagating forward: slice 12 of 80"
    assert panel.progress_text("propagate backward", 3, 80) == "Propagating backward: slice 3 of 80"
    assert panel.progress_text("encode query", 3, 8) == "Encoding the query: slice 3 of 8"
    assert panel.progress_text("encode supports", 8, 64) == "Encoding support slices: slice 8 of 64"
    assert panel.progress_text("register support 2/4", 30, 120) == "Registering support 2 of 4: step 30 of 120"
    assert panel.progress_text("fuse labels", 0, 1) == "Fusing labels"
    assert panel.progress_text("embed library", 2, 5) == "Indexing the library: case 2 of 5"
    assert panel.progress_text("download", 50_000_000, 156_000_000) == "Downloading model weights: 50 of 156 MB"
    assert panel.progress_text("model", 0, 0) == "Loading the model"
    assert panel.progress_text("new_stage", 1, 2) == "New stage: step 1 of 2"
    assert [panel.progress_percent(d, 8) for d in (-1, 0, 4, 8, 9)] == [0, 0, 50, 100, 100]
    assert panel.progress_percent(3, 0) == 0
    assert [panel.format_elapsed(s) for s in (7.9, 723, 3723)] == ["0:07", "12:03", "1:02:03"]


# --- support libraries ----------------------------------------------------------------------------


def test_library_cases_pair_images_with_their_labels(shared_data):
    cases = panel.library_cases(shared_data / "msd_hippocampus")
    assert len(cases) == 5
    assert all(i.name.replace("_img", "_label") == lab.name for i, lab in cases)
    assert panel.describe_library(str(shared_data / "msd_hippocampus")) == "5 labelled case(s)"


def test_an_empty_library_is_explained(tmp_path):
    assert "no labelled case" in panel.describe_library(str(tmp_path))
    assert panel.describe_library("") == "Choose a folder of labelled cases."
    with pytest.raises(InputError):
        panel.library_cases(tmp_path / "absent")


def test_the_worker_says_which_devices_it_sees():
    assert protocol.describe_devices({"cuda": [{"name": "NVIDIA H200", "free_gib": 139.2, "total_gib": 139.8}]}) \
        == "cuda: NVIDIA H200 (139.2 of 139.8 GiB free)"
    assert protocol.describe_devices({"cuda": [], "mps": True}) == "Apple MPS"
    assert protocol.describe_devices({}).startswith("CPU only")
    assert protocol.parse_event(protocol.encode(protocol.ready(7, "0.1.0")))["devices"] == {"cuda": [], "mps": False}
