"""Files appear whole, with the usual permissions, or not at all; a failure leaves the old file as it was."""

import os
import stat

import pytest

from SAM2FewShotLib.common.files import replacing, write_json_atomic


def test_a_finished_block_replaces_the_file_with_the_usual_permissions(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    umask = os.umask(0o022)
    try:
        write_json_atomic({"a": 1}, target)
    finally:
        os.umask(umask)
    assert target.read_text().strip().startswith("{") and '"a": 1' in target.read_text()
    if os.name == "posix":
        assert stat.S_IMODE(target.stat().st_mode) == 0o644  # not mkstemp's 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_a_failed_block_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "weights.pt"
    target.write_bytes(b"good")
    with pytest.raises(RuntimeError):
        with replacing(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.pt"]
