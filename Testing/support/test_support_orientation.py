"""Supports stored in another plane or orientation than the query: cut like the query's slices.

The query is one msd_hippocampus case, the support another; the support is rewritten (same physical
content) as (a) a sagittal acquisition, (b) RAS vs LPS storage, (c) a 10-degree oblique grid and
(d) another in-plane spacing. Each must give the support slices, masks and matches the original
support gives (io/reorient.py, methods/matched_support.py).
"""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SAM2FewShotLib.common.errors import InputError
from SAM2FewShotLib.io.reorient import (
    query_frame_grid,
    query_frame_shape,
    support_in_query_frame,
)
from SAM2FewShotLib.io.slicing import slicing_axis
from SAM2FewShotLib.io.volume import LabelMap, SupportCase, Volume
from SAM2FewShotLib.io.volume_io import read_labels, read_volume
from SAM2FewShotLib.methods.matched_support import FewShotParams, segment_fewshot
from SAM2FewShotLib.sam2.session import VolumeSession
from SAM2FewShotLib.support.entries import (
    match_entries,
    merged_segments,
    support_entries,
)

INTENSITY = FewShotParams(features="intensity", augmentations=1, slices_per_structure=100, top_k=100)  # every slice
NEAR_TIE = 0.02  # cosine: two support slices this close are equally good matches


@pytest.fixture(scope="module")
def cases(shared_data):
    d = shared_data / "msd_hippocampus"
    query = read_volume(d / "hippocampus_015_img.nii.gz")
    image = read_volume(d / "hippocampus_184_img.nii.gz")
    return query, (image, read_labels(d / "hippocampus_184_label.nii.gz", reference=image))


# ---------------------------------------------------------------------------------- variants


def _as(volume: Volume, array: np.ndarray, spacing, origin, columns) -> Volume:
    return Volume(np.ascontiguousarray(array), tuple(spacing), tuple(origin), tuple(np.stack(columns, 1).ravel()))


def sagittal(volume: Volume) -> Volume:
    """(a) the same voxels stored with K along left-right (sagittal slices), I and J in-plane."""
    d, (si, sj, sk) = volume.direction_matrix, volume.spacing
    return _as(volume, np.transpose(volume.array, (2, 0, 1)), (sj, sk, si), volume.origin, [d[:, 1], d[:, 2], d[:, 0]])


def flipped(volume: Volume) -> Volume:
    """(b) RAS-like storage turned LPS-like: I and J reversed, the origin at the other corner."""
    d, sp, (ni, nj, _) = volume.direction_matrix, volume.spacing, volume.shape_ijk
    origin = np.asarray(volume.origin) + d[:, 0] * sp[0] * (ni - 1) + d[:, 1] * sp[1] * (nj - 1)
    return _as(volume, volume.array[:, ::-1, ::-1], sp, origin, [-d[:, 0], -d[:, 1], d[:, 2]])


def rotation(axis, degrees: float) -> np.ndarray:
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    t = np.deg2rad(degrees)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def resampled(volume: Volume, spacing, direction: np.ndarray, linear: bool) -> Volume:
    """The volume on a grid of this spacing and direction around all of it (test-side, plain SimpleITK)."""
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in volume.shape_ijk], indexing="ij")).reshape(3, -1)
    local = direction.T @ (volume.ijk_to_lps()[:3, :3] @ corners + np.asarray(volume.origin)[:, None])
    low, high = local.min(1), local.max(1)
    size = [int(n) for n in np.ceil((high - low) / np.asarray(spacing) - 1e-6) + 1]
    out = sitk.Resample(volume.to_sitk(), size, sitk.Transform(),
                        sitk.sitkLinear if linear else sitk.sitkNearestNeighbor,
                        tuple(direction @ low), tuple(spacing), tuple(direction.ravel()), 0.0)
    return Volume.from_sitk(out)


def variant(kind: str, image: Volume, labels: LabelMap) -> tuple[Volume, LabelMap]:
    if kind in ("sagittal", "flipped"):
        move = sagittal if kind == "sagittal" else flipped
        return move(image), LabelMap(move(labels.volume), labels.segments)
    if kind == "oblique":  # 10 degrees about an in-plane diagonal: the slices tilt
        spacing, direction = image.spacing, rotation((1, 1, 0), 10) @ image.direction_matrix
    else:  # "spacing": 0.75 mm in-plane instead of 1 mm
        spacing, direction = (0.75, 0.75, image.spacing[2]), image.direction_matrix
    return resampled(image, spacing, direction, True), LabelMap(smooth_labels(labels.volume, spacing, direction),
                                                                labels.segments)


def smooth_labels(labels: Volume, spacing, direction: np.ndarray) -> Volume:
    """Labels moved to another grid with as little loss as a test can afford: each structure's mask
    interpolated linearly, the voxel given to the strongest one above 0.5."""
    values = [v for v in np.unique(labels.array) if v]
    fractions = [resampled(labels.with_array((labels.array == v).astype(np.float32)), spacing, direction, True)
                 for v in values]
    stack = np.stack([f.array for f in fractions])
    out = np.where(stack.max(0) > 0.5, np.asarray(values)[stack.argmax(0)], 0).astype(labels.array.dtype)
    return fractions[0].with_array(out)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


def reference_masks(labels: LabelMap, value: int, grid: Volume) -> np.ndarray:
    """The original support's mask of ``value`` on ``grid`` (linear on the binary mask, > 0.5)."""
    mask = labels.volume.with_array((labels.volume.array == value).astype(np.float32))
    return sitk.GetArrayFromImage(sitk.Resample(mask.to_sitk(), grid.to_sitk(), sitk.Transform(),
                                                sitk.sitkLinear)) > 0.5


# ---------------------------------------------------------------------------------- the resampling


def test_a_support_in_the_query_frame_comes_back_as_the_same_objects(cases):
    query, (image, labels) = cases
    out = support_in_query_frame(image, labels, query, slicing_axis(query))
    assert out[0] is image and out[1] is labels
    assert query_frame_shape(image, query, 0) == image.array.shape


@pytest.mark.parametrize("kind", ["sagittal", "flipped"])
def test_axis_swaps_and_flips_become_views_of_the_original_voxels(cases, kind):
    query, (image, labels) = cases
    moved_image, moved_labels = variant(kind, image, labels)
    assert moved_image.array.shape != image.array.shape or not np.array_equal(moved_image.array, image.array)
    back, back_labels = support_in_query_frame(moved_image, moved_labels, query, 0)
    assert np.shares_memory(back.array, moved_image.array)  # no copy, no interpolation
    assert np.shares_memory(back_labels.volume.array, moved_labels.volume.array)
    assert back.same_grid(image, tol=1e-6) and back_labels.volume.same_grid(image, tol=1e-6)
    assert np.array_equal(back.array, image.array) and np.array_equal(back_labels.volume.array, labels.volume.array)
    assert back_labels.segments == labels.segments


@pytest.mark.parametrize("kind", ["oblique", "spacing"])
def test_oblique_or_other_spacing_is_resampled_onto_the_query_axes(cases, kind):
    query, (image, labels) = cases
    moved_image, moved_labels = variant(kind, image, labels)
    axis = slicing_axis(query)
    out, out_labels = support_in_query_frame(moved_image, moved_labels, query, axis)
    assert out.same_grid(out_labels.volume, tol=0)
    assert np.allclose(out.direction_matrix, query.direction_matrix)
    normal_col = 2 - axis
    own = moved_image.direction_matrix
    through = int(np.argmax(np.abs(own.T @ query.direction_matrix[:, normal_col])))
    wanted = list(query.spacing)
    wanted[normal_col] = moved_image.spacing[through]
    assert np.allclose(out.spacing, wanted)
    assert query_frame_shape(moved_image, query, axis) == out.array.shape
    # every voxel centre of the support lies inside the new grid
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in moved_image.shape_ijk], indexing="ij")).reshape(3, -1)
    lps = moved_image.ijk_to_lps() @ np.vstack([corners, np.ones(8)])
    ijk = np.linalg.inv(out.ijk_to_lps()) @ lps
    assert (ijk[:3] > -1e-3).all() and (ijk[:3] < np.asarray(out.shape_ijk)[:, None] - 1 + 1e-3).all()
    assert out_labels.volume.array.dtype == labels.volume.array.dtype and out.array.dtype == moved_image.array.dtype
    assert set(np.unique(out_labels.volume.array)) <= set(np.unique(labels.volume.array))
    for value in (1, 2):  # the structures stay where they were, in millimetres
        assert np.linalg.norm(_centroid_mm(out_labels.volume, value) - _centroid_mm(labels.volume, value)) < 0.5


def _centroid_mm(volume: Volume, value: int) -> np.ndarray:
    k, j, i = np.nonzero(volume.array == value)
    return (volume.ijk_to_lps() @ np.array([i.mean(), j.mean(), k.mean(), 1.0]))[:3]


def test_the_through_plane_spacing_is_the_supports_own_along_the_query_normal():
    query = Volume(np.zeros((10, 20, 20), np.float32), (0.8, 0.8, 2.0), (0, 0, 0))  # axial, LPS
    columns = [(0, 1, 0), (0, 0, 1), (1, 0, 0)]  # K along left-right: sagittal slices 3 mm apart
    support = Volume(np.zeros((12, 30, 40), np.float32), (1.1, 0.9, 3.0), (5, 5, 5), tuple(np.array(columns).T.ravel()))
    grid = query_frame_grid(support, query, axis=0)
    assert grid.spacing == (0.8, 0.8, 0.9)  # S runs along the support's J: 0.9 mm
    assert grid.size == (int(np.ceil(11 * 3.0 / 0.8)) + 1, int(np.ceil(39 * 1.1 / 0.8)) + 1, 30)
    assert np.allclose(grid.origin, (5, 5, 5))


def test_support_labels_on_another_grid_are_refused(cases):
    query, (image, labels) = cases
    shifted = Volume(labels.volume.array, labels.volume.spacing, (0.0, 0.0, 0.0), labels.volume.direction)
    with pytest.raises(InputError, match="different grids"):
        support_in_query_frame(image, LabelMap(shifted, labels.segments), query)


# ---------------------------------------------------------------------------------- matched support


def _entries(session: VolumeSession, support):
    supports = SupportCase.listed([support])
    segments = merged_segments(supports)
    p = INTENSITY
    entries = support_entries(supports, session, segments, p.augmentations, p.slices_per_structure, False, p.seed)
    return entries, match_entries(session, entries, None, p.features, p.position_weight, p.top_k)


@pytest.fixture(scope="module")
def original(small_predictor, cases):
    query, support = cases
    session = VolumeSession(small_predictor, query)
    return session, _entries(session, support)


@pytest.mark.parametrize("kind", ["sagittal", "flipped", "oblique", "spacing"])
def test_matched_support_cuts_the_same_slices_from_a_reoriented_support(original, cases, kind):
    session, (entries0, matches0) = original
    query, (image, labels) = cases
    moved = variant(kind, image, labels)
    entries, matches = _entries(session, moved)
    offsets0 = np.array([m["support_offset_mm"] for m in entries0.meta])
    offsets = np.array([m["support_offset_mm"] for m in entries.meta])
    assert (all(m["support_reoriented"] for m in entries.meta)
            and not any(m["support_reoriented"] for m in entries0.meta))
    if kind in ("sagittal", "flipped"):  # the very same slices, voxel for voxel, and the same matches
        assert torch.equal(entries.images01, entries0.images01) and torch.equal(entries.masks, entries0.masks)
        assert [m["support_slice"] for m in entries.meta] == [m["support_slice"] for m in entries0.meta]
        for value in (1, 2):
            assert np.array_equal(matches.entries[value], matches0.entries[value])
        return
    _, frame = support_in_query_frame(*moved, query, session.axis)
    through = frame.volume.spacing[2 - session.axis]  # one slice of the reoriented support
    for value in (1, 2):
        chosen0 = offsets0[entries0.structure == value]  # every slice with the structure: its extent
        chosen = offsets[entries.structure == value]
        gap = np.abs(chosen[:, None] - chosen0[None, :])
        assert gap.min(axis=1).max() <= through + 1e-3 and gap.min(axis=0).max() <= through + 1e-3
        truth = reference_masks(labels, value, frame.volume)
        rows = np.flatnonzero(entries.structure == value)
        cut = np.stack([entries.masks[r].numpy() for r in rows])
        want = np.stack([truth[entries.meta[r]["support_slice"]] for r in rows])
        if kind == "spacing":  # 0.75 mm and back to 1 mm in-plane, through-plane untouched: every slice agrees
            assert min(dice(c, w) for c, w in zip(cut, want, strict=True)) > 0.9
            _same_matches_up_to_ties(value, matches, matches0, offsets, offsets0, through)
        else:  # a rotated grid half a slice off the original's: the body of the structure agrees slice by
            # slice; its ends change fast from one slice to the next, so they count in the pooled Dice only
            body = want.sum(axis=(1, 2)) >= 0.4 * want.sum(axis=(1, 2)).max()
            assert min(dice(c, w) for c, w in zip(cut[body], want[body], strict=True)) > 0.85 and dice(cut, want) > 0.9


def _same_matches_up_to_ties(value, matches, matches0, offsets, offsets0, through) -> None:
    """Every query slice's best support slice is the original's within one slice, or the original run
    scored a slice within one slice of it as well as its best (a near-tie)."""
    for t, best in enumerate(matches.best(value)):
        best0 = matches0.best(value)[t]
        if abs(offsets[best] - offsets0[best0]) <= through + 1e-3:
            continue
        ranked, sims = matches0.entries[value][t], matches0.similarity[value][t]
        near = [s for e, s in zip(ranked, sims, strict=True) if abs(offsets0[e] - offsets[best]) <= through + 1e-3]
        assert near and sims[0] - max(near) <= NEAR_TIE, f"query slice {t}: support slice {offsets[best]} mm"


def test_without_reorientation_a_flipped_support_gives_mirrored_masks(cases):
    """The check above has teeth: the flipped support's raw slices disagree with the original's."""
    query, (image, labels) = cases
    _, moved = variant("flipped", image, labels)
    axis = slicing_axis(moved.volume, "axial")
    k = int(np.argmax(np.count_nonzero(labels.volume.array == 1, axis=(1, 2))))
    assert dice(np.take(moved.volume.array, k, axis=axis) == 1, labels.volume.array[k] == 1) < 0.5


def test_a_run_with_an_oblique_support_has_the_query_geometry(small_predictor, cases):
    """The random-weight model end to end (128 px) with the resampled support: mechanics and geometry."""
    query, (image, labels) = cases
    moved = variant("oblique", image, labels)
    session = VolumeSession(small_predictor, query)
    out, rep = segment_fewshot(session, [moved], FewShotParams(scheme="video+memory", features="sam2", augmentations=2,
                                                               slices_per_structure=3, top_k=2))
    assert out.volume.same_grid(query, tol=0) and out.volume.array.shape == query.array.shape
    assert [(g.value, g.name) for g in out.segments] == [(1, "label_1"), (2, "label_2")]
    assert set(np.unique(out.volume.array)) <= {0, 1, 2}
    frame, _ = support_in_query_frame(*moved, query, session.axis)
    assert session.axis == 0  # axial slices of the isotropic case: K indexes them
    normal = query.direction_matrix[:, 2 - session.axis]
    span = sorted(float(normal @ (frame.ijk_to_lps() @ [0, 0, k, 1])[:3]) for k in (0, frame.array.shape[0] - 1))
    assert len(rep["slices"]) == session.num_slices
    for entry in rep["slices"]:
        for name in ("label_1", "label_2"):
            obj = entry["objects"][name]
            assert obj["support_reoriented"] is True and 0 <= obj["support_slice"] < frame.array.shape[0]
            assert span[0] - 1e-3 <= obj["support_offset_mm"] <= span[1] + 1e-3
