"""`library add`: one labelled case into a folder or list-file library, embedded alone into the existing
indexes (the other shards untouched, the new one equal to a full build's), refusals that write nothing."""

import json
import os
import shutil

import numpy as np
import pytest

from phantoms import phantom
from SAM2FewShotLib.cli.main import EXIT_ERROR
from SAM2FewShotLib.cli.main import main as cli_main
from SAM2FewShotLib.common.digests import file_digest
from SAM2FewShotLib.common.errors import InputError
from SAM2FewShotLib.io.volume import LabelMap
from SAM2FewShotLib.io.volume_io import read_labels, write_labels, write_volume
from SAM2FewShotLib.library import add as library_add
from SAM2FewShotLib.library.add import add_case, case_name
from SAM2FewShotLib.library.cases import INDEX_FOLDER, open_library, write_list_file
from SAM2FewShotLib.library.index import EmbeddingIndex
from SAM2FewShotLib.library.sync import library_features, sync_library

# One thread: an embedding is bit-identical only at one thread count (the default follows the machine's load).
MODEL = ["--random-weights", "--image-size", "128", "--device", "cpu", "--threads", "1", "-q"]
SHAPE = (6, 32, 32)


def _case(folder, stem, seed, shape=SHAPE, sidecar=True):
    """A phantom case as stem_img.nii.gz + stem_label.nii.gz (and a sidecar naming its structure)."""
    folder.mkdir(parents=True, exist_ok=True)
    image, labels = phantom(shape_kji=shape, n_objects=1, seed=seed)
    write_volume(image, folder / f"{stem}_img.nii.gz")
    write_labels(labels, folder / f"{stem}_label.nii.gz")
    if sidecar:
        (folder / f"{stem}_label.json").write_text(json.dumps(
            {"segments": [{"value": 1, "name": "lesion", "color": [1, 0.5, 0]}]}))
    return folder / f"{stem}_img.nii.gz", folder / f"{stem}_label.nii.gz"


def _library(folder):
    for n, stem in enumerate(("alpha", "beta")):
        _case(folder, stem, seed=2 + n, sidecar=False)
    return folder


def _tree(folder):
    """Every file under ``folder`` with its bytes' digest and mtime: what 'nothing written' compares."""
    return {str(p.relative_to(folder)): (file_digest(p), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _shards(folder):
    [index] = EmbeddingIndex.existing(open_library(folder).index_root())
    manifest = json.loads(index.manifest_path.read_text())
    return index, {cid.rsplit("/", 1)[-1]: entry for cid, entry in manifest["cases"].items()}


@pytest.fixture
def sam2_features(small_predictor):
    return library_features("sam2", small_predictor)


# ------------------------------------------------------------------------------------ folder library, CLI


def test_cli_add_embeds_only_the_new_case_as_a_full_build_would(tmp_path, capsys):
    lib = _library(tmp_path / "lib")
    image, labels = _case(tmp_path / "reviewed", "case07", seed=5)
    assert cli_main(["library", "build", str(lib), "--features", "sam2", *MODEL]) == 0
    capsys.readouterr()
    index, before = _shards(lib)
    old_files = {f: (file_digest(index.folder / f), (index.folder / f).stat().st_mtime_ns)
                 for e in before.values() for f in (s["file"] for s in e["shards"].values())}

    assert cli_main(["library", "add", str(lib), str(image), str(labels), "--name", "gamma", *MODEL]) == 0
    out = capsys.readouterr().out
    assert "added gamma_label.nii.gz" in out and "1 embedded, 2 reused" in out, out
    for kind in ("img.nii.gz", "label.nii.gz", "label.json"):
        source = {"img.nii.gz": image, "label.nii.gz": labels, "label.json": labels.with_name("case07_label.json")}
        assert file_digest(lib / f"gamma_{kind}") == file_digest(source[kind])
    _, after = _shards(lib)
    assert set(after) == {"alpha_label.nii.gz", "beta_label.nii.gz", "gamma_label.nii.gz"}
    assert {c: after[c] for c in before} == before  # the old cases' entries and shards as they were
    assert old_files == {f: (file_digest(index.folder / f), (index.folder / f).stat().st_mtime_ns) for f in old_files}
    assert after["gamma_label.nii.gz"]["segments"][0]["name"] == "lesion"  # the sidecar went with it

    fresh = tmp_path / "fresh"
    shutil.copytree(lib, fresh, ignore=shutil.ignore_patterns(INDEX_FOLDER))
    assert cli_main(["library", "build", str(fresh), "--features", "sam2", *MODEL]) == 0
    capsys.readouterr()
    fresh_index, rebuilt = _shards(fresh)
    assert fresh_index.folder.name == index.folder.name  # the same configuration
    new, full = after["gamma_label.nii.gz"], rebuilt["gamma_label.nii.gz"]
    assert new["content"] == full["content"] and new["segments"] == full["segments"]
    for kind in ("emb", "rows"):
        added = np.load(index.folder / new["shards"][kind]["file"])
        built = np.load(fresh_index.folder / full["shards"][kind]["file"])
        assert np.array_equal(added, built)

    assert cli_main(["library", "info", str(lib), "--json"]) == 0
    [ix] = json.loads(capsys.readouterr().out)["indexes"]
    assert ix["cases_indexed"] == 3 and ix["current"] == 3


def test_cli_add_to_a_library_without_index_says_build_embeds_it(tmp_path, capsys):
    lib = tmp_path / "new_library"  # not there yet: its first case starts it
    image, labels = _case(tmp_path / "in", "first_img_case", seed=4)
    assert cli_main(["library", "add", str(lib), str(image), str(labels), *MODEL]) == 0
    out = capsys.readouterr().out
    assert "no index yet" in out
    assert [c.id for c in open_library(lib).cases] == ["first_img_case_label.nii.gz"]


# ------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("problem", ["name exists", "other grid", "no labelled voxel", "label file missing",
                                     "detached header"])
def test_refusals_are_one_line_and_write_nothing(tmp_path, capsys, problem):
    lib = _library(tmp_path / "lib")
    image, labels = _case(tmp_path / "in", "case", seed=6)
    name = []
    if problem == "name exists":
        name = ["--name", "alpha"]
    elif problem == "other grid":
        _, other = phantom(shape_kji=(6, 32, 30), n_objects=1, seed=6)
        write_labels(other, labels)
    elif problem == "no labelled voxel":
        found = read_labels(labels)
        write_labels(LabelMap(found.volume.with_array(np.zeros_like(found.volume.array)), found.segments), labels)
    elif problem == "label file missing":
        labels.unlink()
    else:
        image_path = tmp_path / "in" / "case_img.nhdr"
        volume, _ = phantom(shape_kji=SHAPE, n_objects=1, seed=6)
        import SimpleITK as sitk

        sitk.WriteImage(volume.to_sitk(), str(image_path))
        image = image_path
    before = _tree(tmp_path)
    assert cli_main(["library", "add", str(lib), str(image), str(labels), *name, *MODEL]) == EXIT_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sam2fewshot: error: "), err
    expected = {"name exists": "already has the case alpha_label.nii.gz", "other grid": "different grids",
                "no labelled voxel": "no labelled voxel", "label file missing": "does not exist",
                "detached header": "not a single-file volume"}[problem]
    assert expected in err, err
    assert _tree(tmp_path) == before


# ------------------------------------------------------------------------------------ list file, engine


def test_add_to_a_list_file_library_lists_the_files_and_embeds_only_them(tmp_path, sam2_features):
    cases = [_case(tmp_path / "data", stem, seed=s) for stem, s in (("a", 2), ("b", 3))]
    (tmp_path / "listlib").mkdir()
    listing = write_list_file(cases[:1], tmp_path / "listlib")
    _, data, stats = sync_library(open_library(listing), sam2_features)
    assert stats.embedded == 1

    result = add_case(listing, *cases[1], features=lambda names: [sam2_features] if names == ["sam2"] else [])
    assert result.placement == "list" and result.written == (listing,)
    listed = json.loads(listing.read_text())["cases"]
    assert listed[1] == {"image": str(cases[1][0].resolve()), "labels": str(cases[1][1].resolve())}
    [update] = result.indexes
    assert (update.embedded, update.reused, update.plane) == (1, 1, "axial")
    _, again, stats = sync_library(open_library(listing), sam2_features)
    assert stats.embedded == 0 and len(again) > len(data)

    with pytest.raises(InputError, match="already has the case"):
        add_case(listing, *cases[1], features=[sam2_features])
    copied = add_case(listing, *cases[1], placement="copy", name="b_copy", index=False)
    assert copied.case.labels == (tmp_path / "listlib" / "b_copy_label.nii.gz").resolve()
    assert (tmp_path / "listlib" / "b_copy_label.json").is_file()
    assert len(open_library(listing)) == 3


# ------------------------------------------------------------------------------------ replace, link, undo


def test_replace_link_and_a_failed_add_puts_everything_back(tmp_path, monkeypatch):
    lib = _library(tmp_path / "lib")
    image, labels = _case(tmp_path / "in", "alpha_fixed", seed=8)
    before = _tree(lib)

    def fail(*args, **kwargs):
        raise InputError("embedding failed")

    monkeypatch.setattr(library_add, "update_indexes", fail)
    with pytest.raises(InputError, match="embedding failed"):
        add_case(lib, image, labels, name="alpha", replace=True)
    assert _tree(lib) == before  # the replaced case back, the new files gone
    monkeypatch.undo()

    result = add_case(lib, image, labels, name="alpha", replace=True, placement="link", index=False)
    assert result.replaced == ("alpha_label.nii.gz",) and result.placement == "link"
    assert os.path.islink(lib / "alpha_img.nii.gz") and os.path.islink(lib / "alpha_label.json")
    assert not list(lib.glob(".*replaced"))
    case = open_library(lib).case(result.case.id)
    assert case.image == lib / "alpha_img.nii.gz"
    assert case.load()[1].segments[0].name == "lesion"


def test_case_names_and_the_nnunet_layout(tmp_path):
    assert case_name(tmp_path / "case01_img.nii.gz") == "case01"
    assert case_name(tmp_path / "case01_0000.nii.gz") == "case01"
    assert case_name(tmp_path / "case01.seg.nrrd") == "case01"
    lib = tmp_path / "msd"
    image, labels = phantom(shape_kji=SHAPE, n_objects=1, seed=2)
    (lib / "imagesTr").mkdir(parents=True)
    (lib / "labelsTr").mkdir()
    write_volume(image, lib / "imagesTr" / "hippo_001.nii.gz")
    write_labels(labels, lib / "labelsTr" / "hippo_001.nii.gz")
    new_image, new_labels = _case(tmp_path / "in", "x", seed=3, sidecar=False)
    result = add_case(lib, new_image, new_labels, name="hippo_002", index=False)
    assert result.case.image == lib / "imagesTr" / "hippo_002.nii.gz"
    assert result.case.labels == lib / "labelsTr" / "hippo_002.nii.gz"
