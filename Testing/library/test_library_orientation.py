"""Library cases as the query sees them: a case stored flipped, transposed or at another in-plane spacing is
indexed as the same slices, retrieved for the same query slices, and handed to SAM2 in the query's frame.

Every copy below holds the same physical image as the original (direction matrix and array changed together,
or resampled with SimpleITK); the features are SAM2's real encoder with seeded random weights. The phantoms get
an intensity ramp across the plane that grows from slice to slice: without it their slices are mirror images of
each other along the slicing axis, and random-weight features rank them within 1e-6 of each other.
"""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from phantoms import phantom, rotation
from SAM2FewShotLib.common.digests import json_digest
from SAM2FewShotLib.io.reorient import support_in_query_frame
from SAM2FewShotLib.io.slice_frame import into_frame, slice_frame
from SAM2FewShotLib.io.volume import LabelMap, Volume
from SAM2FewShotLib.io.volume_io import write_labels, write_volume
from SAM2FewShotLib.library.cases import labelled_slices, open_library
from SAM2FewShotLib.library.index import FORMAT, EmbeddingIndex
from SAM2FewShotLib.library.retrieval import conditioning_entries, query_embeddings, retrieve
from SAM2FewShotLib.library.sync import library_features, sync_library
from SAM2FewShotLib.methods.retrieval import RetrievalParams
from SAM2FewShotLib.sam2.frames import VolumeSlices
from SAM2FewShotLib.sam2.session import VolumeSession

SHAPE = (6, 30, 38)  # k, j, i: axial slices of 30 x 38 pixels, non-square pixels (0.8 x 0.9 mm)
SPACING = (0.8, 0.9, 2.5)
NORMALIZATION = RetrievalParams().normalization
# A copy resampled to another in-plane spacing is the same image only up to linear interpolation (twice:
# into its grid, and back into the query's). Measured with random-weight SAM2 at 128 px: its vectors lie within
# 5e-4 (1 - cosine) of the original's, where the flip-i copy embedded as stored lay up to 3e-2 away and
# neighbouring slices 1.6e-2 apart; its cosines to the query's slices within 1.1e-2 of the original's; its
# pixels in the query's frame within 0.03 of [0, 1] in the mean.
RESAMPLED_COSINE_TOL = 0.02
RESAMPLED_PIXEL_TOL = 0.06


def _flipped(volume: Volume, itk_axis: int) -> Volume:
    """The same physical image with ITK axis ``itk_axis`` stored the other way round."""
    d = volume.direction_matrix.copy()
    origin = np.asarray(volume.origin) + d[:, itk_axis] * volume.spacing[itk_axis] * (volume.shape_ijk[itk_axis] - 1)
    d[:, itk_axis] *= -1
    return Volume(np.ascontiguousarray(np.flip(volume.array, axis=2 - itk_axis)), volume.spacing, tuple(origin),
                  tuple(d.ravel()))


def _transposed(volume: Volume) -> Volume:
    """The same physical image with its i and j axes swapped (columns stored as rows)."""
    sp = volume.spacing
    return Volume(np.ascontiguousarray(volume.array.swapaxes(1, 2)), (sp[1], sp[0], sp[2]), volume.origin,
                  tuple(volume.direction_matrix[:, [1, 0, 2]].ravel()))


def _resampled(volume: Volume, spacing_ij: tuple[float, float], linear: bool) -> Volume:
    """The image sampled by SimpleITK at another in-plane spacing over the same box (same slices)."""
    spacing = (*spacing_ij, volume.spacing[2])
    extent = np.asarray(volume.spacing) * (np.asarray(volume.shape_ijk) - 1)
    size = [int(np.floor(e / s + 1e-6)) + 1 for e, s in zip(extent, spacing, strict=True)]
    f = sitk.ResampleImageFilter()
    f.SetSize(size)
    f.SetOutputSpacing(spacing)
    f.SetOutputOrigin(volume.origin)
    f.SetOutputDirection(volume.direction)
    f.SetInterpolator(sitk.sitkLinear if linear else sitk.sitkNearestNeighbor)
    return Volume.from_sitk(f.Execute(volume.to_sitk()))


def _copy(case: tuple[Volume, LabelMap], how) -> tuple[Volume, LabelMap]:
    image, labels = case
    if how == "resampled":
        return _resampled(image, (0.55, 0.7), True), LabelMap(_resampled(labels.volume, (0.55, 0.7), False),
                                                              labels.segments)
    moved_image, moved_labels = image, labels.volume
    for step in how:
        move = _transposed if step == "t" else (lambda v, s=step: _flipped(v, int(s)))
        moved_image, moved_labels = move(moved_image), move(moved_labels)
    return moved_image, LabelMap(moved_labels, labels.segments)


EXACT = {"flip-i": "0", "flip-j": "1", "flip-ij (RAS)": "01", "transposed": "t", "transposed+flip-i": "t0"}


def _ramped(seed: int) -> tuple[Volume, LabelMap]:
    """A phantom whose slices differ in more than the structures' size (see the module's docstring)."""
    image, labels = phantom(SHAPE, spacing=SPACING, n_objects=2, seed=seed)
    ramp = np.arange(SHAPE[0])[:, None, None] * 60.0 * np.linspace(0.0, 1.0, SHAPE[2])[None, None, :]
    return Volume((image.array + ramp).astype(np.float32), image.spacing, image.origin, image.direction), labels


@pytest.fixture(scope="module")
def original():
    return _ramped(4)


@pytest.fixture(scope="module")
def query():
    return _ramped(9)  # another case, stored as the original


@pytest.fixture(scope="module")
def reference(tmp_path_factory, original, query, features, small_predictor):
    """The query's session and what it retrieves from a library of the original as it is stored."""
    session = VolumeSession(small_predictor, query[0])
    return session, _retrieval(_library(tmp_path_factory.mktemp("original") / "lib", original), session, features)


@pytest.fixture(scope="module")
def features(small_predictor):
    return library_features("sam2", small_predictor)


def _library(folder, case):
    folder.mkdir(parents=True)
    write_volume(case[0], folder / "case.nrrd")
    write_labels(case[1], folder / "case.seg.nrrd")
    return open_library(folder)


def _retrieval(library, session, features, top_k=SHAPE[0]):  # every labelled slice, ranked
    _, data, _ = sync_library(library, features, "axial", NORMALIZATION)
    hits = retrieve(session, data, query_embeddings(session, features), top_k=top_k, window=None, neighbours=1)
    entries, _ = conditioning_entries(library, data, hits, session, "axial", NORMALIZATION)
    return data, hits, entries


def _retrieved(data, hits):
    """Per structure: (query slices, k) library slice numbers, and their cosines."""
    return {v: (data.rows["slice"][h.rows], h.similarity) for v, h in hits.items()}


def test_copies_are_the_same_physical_image(original):
    """The test's own premise: each exact copy, brought back into the original's frame, is the original."""
    for how in EXACT.values():
        image, labels = _copy(original, how)
        assert not np.array_equal(image.array.shape, original[0].array.shape) or not np.array_equal(
            image.array, original[0].array)
        back, back_labels = support_in_query_frame(image, labels, original[0])
        assert back.same_grid(original[0]) and np.array_equal(back.array, original[0].array)
        assert np.array_equal(back_labels.volume.array, original[1].volume.array)


def test_indexed_slices_do_not_depend_on_how_the_case_is_stored(original, features):
    """The index's slices of every exact copy are the original's, pixel for pixel; embedded as stored they
    would not be (the features see mirrored and transposed pictures)."""
    want = labelled_slices(*original, "axial", NORMALIZATION)
    for how in EXACT.values():
        image, labels = _copy(original, how)
        got = labelled_slices(image, labels, "axial", NORMALIZATION)
        assert np.array_equal(got.images01, want.images01) and np.array_equal(got.rows, want.rows)
    as_stored = torch.from_numpy(np.ascontiguousarray(want.images01[:, :, ::-1]))  # the flip-i copy's own slices
    cos = (features.extractor.embed(as_stored) * features.extractor.embed(torch.from_numpy(want.images01))).sum(1)
    assert cos.min() < 0.99  # what the index held before: another picture, another vector


@pytest.mark.parametrize("how", [*EXACT, "resampled"])
def test_copies_retrieve_the_original_slices_in_the_query_frame(tmp_path, original, reference, features, how):
    session, (orig_data, orig_hits, orig_entries) = reference
    data, hits, entries = _retrieval(_library(tmp_path / "copy", _copy(original, EXACT.get(how, how))), session,
                                     features)
    want, got = _retrieved(orig_data, orig_hits), _retrieved(data, hits)
    exact = how != "resampled"
    for v, (slices, cosines) in want.items():
        other_slices, other_cosines = got[v]
        if exact:  # the very same vectors: the same slices in the same order, the same cosines
            assert np.array_equal(other_slices, slices) and np.allclose(other_cosines, cosines, atol=1e-6), (how, v)
            continue
        by_slice, other_by_slice = _cosine_of_slice(slices, cosines), _cosine_of_slice(other_slices, other_cosines)
        moved = np.nanmax(np.abs(other_by_slice - by_slice))
        assert moved <= RESAMPLED_COSINE_TOL, (v, moved)
        # the same slice at every rank where the original's cosines are further apart than the copy's moved them
        gaps = -np.diff(cosines, axis=1) > 2 * moved
        decided = np.concatenate([gaps[:, :1], gaps[:, :-1] & gaps[:, 1:], gaps[:, -1:]], axis=1)
        assert decided.sum() >= 10 and np.array_equal(other_slices[decided], slices[decided]), (v, decided.sum())
    _check_entries_in_query_frame(entries, original, session, exact)
    assert all(m["library_reoriented"] for m in entries.meta)
    assert not any(m["library_reoriented"] for m in orig_entries.meta)


def _cosine_of_slice(slices: np.ndarray, cosines: np.ndarray) -> np.ndarray:
    """(query slices, library slices) cosines, from the (query slices, k) retrieved slices and cosines."""
    out = np.full((len(slices), SHAPE[0]), np.nan)
    np.put_along_axis(out, slices.astype(int), cosines, axis=1)
    return out


def _check_entries_in_query_frame(entries, original, session, exact):
    """What SAM2 is handed: every retrieved slice is the original's slice as the query's frame shows it."""
    image01 = VolumeSlices(original[0].array, session.axis, NORMALIZATION)
    labels = session.slices_of(original[1].volume.array)
    assert tuple(entries.images01.shape[1:]) == (session.frames.height, session.frames.width)
    for n, meta in enumerate(entries.meta):
        s, v = meta["library_slice"], int(entries.structure[n])
        img, mask = entries.images01[n].numpy(), entries.masks[n].numpy()
        want_img, want_mask = image01[s].numpy(), labels[s] == v
        if exact:
            assert np.array_equal(mask, want_mask) and np.allclose(img, want_img, atol=1e-6)
        else:
            assert np.abs(img - want_img).mean() < RESAMPLED_PIXEL_TOL
            dice = 2 * (mask & want_mask).sum() / (mask.sum() + want_mask.sum())
            assert dice > 0.85, dice


def test_a_query_stored_otherwise_retrieves_as_the_original_and_gets_slices_in_its_frame(
        tmp_path, original, query, reference, features, small_predictor):
    """A query stored flipped and transposed is embedded in the index's convention (not as stored): the same
    slices and cosines as the same query stored as the original; the entries come in its own frame."""
    _, (_, hits, _) = reference
    turned_query = _copy(query, "t1")[0]
    turned = VolumeSession(small_predictor, turned_query)
    _, turned_hits, entries = _retrieval(_library(tmp_path / "lib", original), turned, features)
    for v, h in hits.items():
        assert np.array_equal(turned_hits[v].rows, h.rows)
        assert np.allclose(turned_hits[v].similarity, h.similarity, atol=1e-4)
    back, back_labels = support_in_query_frame(*original, turned_query)  # the original in the query's frame
    _check_entries_in_query_frame(entries, (back, back_labels), turned, exact=True)


def test_an_index_embedded_as_stored_is_not_reused(tmp_path, original, features):
    """The index config names the slice convention and format 2: a format-1 index (slices as stored) has
    another id, so its folder is never read, and `library info` no longer lists it."""
    library = _library(tmp_path / "lib", original)
    index, _, stats = sync_library(library, features, "axial", NORMALIZATION)
    config = index.config.as_dict()
    assert FORMAT == 2 and config["slices"] and stats.embedded == 1
    old = {k: v for k, v in config.items() if k != "slices"} | {"format": 1}
    old_folder = index.root / json_digest(old, 16)
    old_folder.mkdir()
    (old_folder / "manifest.json").write_text(index.manifest_path.read_text().replace('"format": 2', '"format": 1'))
    assert [i.folder for i in EmbeddingIndex.existing(index.root)] == [index.folder]
    again, _, stats = sync_library(library, features, "axial", NORMALIZATION)
    assert again.folder == index.folder and stats.reused == 1


def test_a_case_rotated_in_the_plane_comes_as_io_reorient_resamples_it(query):
    """Retrieved slices of a case rotated in the plane (and at another spacing) are resampled onto the query's
    axes and spacing: the slices of the whole case resampled by io/reorient, as matched support would."""
    image, labels = phantom((4, 26, 30), spacing=(0.7, 0.6, 2.5), direction=rotation("z", 25), n_objects=1, seed=3)
    target = query[0]
    back, back_labels = support_in_query_frame(image, labels, target, 0)
    own = slice_frame(image, 0)
    got = into_frame(image.array, own, slice_frame(target, 0), linear=True)
    got_labels = into_frame(labels.volume.array, own, slice_frame(target, 0), linear=False)
    assert got.shape == back.array.shape and np.allclose(got, back.array, atol=1e-3)
    assert got_labels.dtype == labels.volume.array.dtype and np.array_equal(got_labels, back_labels.volume.array)
