"""Paths checked before any work (common/paths.py), temporaries that fit and follow links (common/files.py),
the cache folder's one-line refusal (common/cache.py), and messages that give the real reason."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
from permissions import SKIP_REASON, permissions_enforced

from SAM2FewShotLib.common.cache import CACHE_ENV, require_cache
from SAM2FewShotLib.common.errors import InputError
from SAM2FewShotLib.common.files import (
    TEMPORARY_ROOM,
    final_path,
    replacing,
    sweep_stale_temporaries,
    temporary_name_bytes,
    temporary_stem,
)
from SAM2FewShotLib.common.paths import check_path_text, check_readable, name_limit, shown
from SAM2FewShotLib.io.volume import Volume
from SAM2FewShotLib.io.volume_io import _itk_reason, _label_array

ROOT = not permissions_enforced()  # root, normally: the skipped tests say so


def _dead_pid() -> int:
    """The id of a process that has ended (a killed writer's)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_paths_that_are_not_utf8_or_hold_nul_are_refused_and_shown_printably():
    with pytest.raises(InputError, match=r"the output /x/o\\xff.nii.gz is not valid UTF-8"):
        check_path_text("/x/o\udcff.nii.gz", "the output")
    with pytest.raises(InputError, match="NUL"):
        check_path_text("/x/a\0b", "the query")
    check_path_text("/x/ümlaut ✓.nii.gz", "the output")  # any valid UTF-8 is fine
    assert shown("x" * 1000).endswith("...") and len(shown("x" * 1000)) == 200


def test_files_that_are_not_regular_are_refused_by_stat_alone(tmp_path):
    fifo = tmp_path / "q.nrrd"
    os.mkfifo(fifo)  # opening it would block: check_readable must not
    with pytest.raises(InputError, match="not a regular file but a FIFO"):
        check_readable(fifo, "the query")
    with pytest.raises(InputError, match="character device"):
        check_readable(os.devnull, "the query")
    with pytest.raises(InputError, match="the query .* does not exist"):
        check_readable(tmp_path / "missing.nrrd", "the query")
    with pytest.raises(InputError, match="does not exist"):
        check_readable(tmp_path / "missing" / "q.nrrd", "the query")
    with pytest.raises(InputError, match="not a usable file name"):
        check_readable(tmp_path / ("x" * 300), "the query")
    check_readable(tmp_path, "the DICOM folder")  # a readable folder is fine


@pytest.mark.skipif(ROOT, reason=SKIP_REASON)
def test_permission_denied_is_not_reported_as_missing(tmp_path):
    secret = tmp_path / "q.nrrd"
    secret.write_bytes(b"x")
    secret.chmod(0)
    try:
        with pytest.raises(InputError, match="permission denied"):
            check_readable(secret, "the query")
    finally:
        secret.chmod(0o600)


def test_any_name_that_fits_has_a_temporary_that_fits(tmp_path):
    limit = name_limit(tmp_path)
    short, long = tmp_path / "result.nii.gz", tmp_path / ("n" * (limit - 7) + ".nii.gz")
    assert temporary_stem(short) == "result.nii.gz"
    assert temporary_stem(long).startswith("~") and temporary_name_bytes(long) <= limit
    assert temporary_stem(long) != temporary_stem(tmp_path / ("m" * (limit - 7) + ".nii.gz"))
    with replacing(long, suffix=".nii.gz") as tmp:
        assert len(os.fsencode(tmp.name)) <= limit
        tmp.write_bytes(b"labels")
    assert long.read_bytes() == b"labels" and sorted(tmp_path.iterdir()) == [long]
    assert TEMPORARY_ROOM >= len(".") + len(".4194304.") + 8 + len(".tmp.seg.nrrd")


def test_stale_temporaries_of_long_names_are_swept_but_not_other_names(tmp_path):
    long = tmp_path / ("n" * 240 + ".nii.gz")
    stale = tmp_path / f".{temporary_stem(long)}.{_dead_pid()}.abc_123.tmp.nii.gz"
    other = tmp_path / f".a.5.{_dead_pid()}.abc_123.tmp"  # a temporary of "a.5", not of "a"
    live = tmp_path / f".{temporary_stem(long)}.{os.getpid()}.abc_123.tmp.nii.gz"
    for p in (stale, other, live):
        p.write_bytes(b"")
    assert sweep_stale_temporaries(long) == [stale]
    assert sweep_stale_temporaries(tmp_path / "a") == [] and other.exists() and live.exists()


def test_a_write_through_a_symlink_replaces_its_target_and_keeps_the_link(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    target, link = tmp_path / "b" / "real.json", tmp_path / "a" / "link.json"
    target.write_text("old")
    link.symlink_to(target)
    assert final_path(link) == target.resolve() and final_path(target) == target
    with replacing(link) as tmp:
        assert tmp.parent == target.parent.resolve()  # made beside the target: never renamed across file systems
        tmp.write_text("new")
    assert link.is_symlink() and target.read_text() == "new"
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["real.json"]


@pytest.mark.parametrize("setting, words", [
    ("a_file", "is not a folder: point it to a folder you can write"),
    ("a_file/sub", "cannot be made: "),
])
def test_a_cache_that_cannot_be_a_folder_is_one_line_naming_the_setting(tmp_path, monkeypatch, setting, words):
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / setting))
    with pytest.raises(InputError, match=f"{CACHE_ENV}=.*{words}"):
        require_cache()
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "new" / "cache"))
    assert require_cache() == tmp_path / "new" / "cache"  # one that can be made is fine (nothing is made here)
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(ROOT, reason=SKIP_REASON)
def test_a_read_only_cache_is_refused(tmp_path, monkeypatch):
    tmp_path.joinpath("ro").mkdir(mode=0o500)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "ro"))
    with pytest.raises(InputError, match="is not writable"):
        require_cache()


def test_itk_messages_lose_pointer_addresses():
    exc = RuntimeError("Exception thrown in SimpleITK ReadImage: /src/itkImageFileReader.hxx:135:\n"
                       "ITK ERROR: ImageFileReader(0x55d1c2a3b4c0): Could not create IO object for x.nrrd\n"
                       "  The file doesn't exist. ImageIO (0x7f00aa11bb22) said: nothing")
    reason = _itk_reason(exc)
    assert "0x" not in reason and "Could not create IO object" in reason and "ImageIO said" in reason


def test_nan_labels_are_called_nan_not_fractional():
    labels = np.zeros((2, 3, 3), np.float32)
    labels[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="found NaN values"):
        _label_array(labels, "x.nrrd")
    labels[0, 0, 0] = 1.5
    with pytest.raises(InputError, match="fractional"):
        _label_array(labels, "x.nrrd")


def test_a_grid_mismatch_names_only_the_fields_that_differ_with_both_values():
    a = Volume(np.zeros((4, 5, 6)), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    turned = Volume(np.zeros((4, 5, 6)), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, -1, 0, 0, 0, -1))
    with pytest.raises(InputError) as caught:
        a.require_same_grid(turned, "labels x")
    message = str(caught.value)
    assert "different grids: direction (1, 0, 0, 0, -1, 0, 0, 0, -1) vs (1, 0, 0, 0, 1, 0, 0, 0, 1)" in message
    assert "shape" not in message and "spacing" not in message and "origin" not in message
    moved = Volume(np.zeros((4, 5, 7)), (1.0, 1.0, 2.0), (0.0, 3.0, 0.0))
    with pytest.raises(InputError, match=r"shape \(7, 5, 4\) vs \(6, 5, 4\), origin \(0, 3, 0\) vs \(0, 0, 0\)$"):
        a.require_same_grid(moved)
