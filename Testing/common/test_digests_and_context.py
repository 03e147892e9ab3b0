"""The common layer's small parts on their own: one way to digest each kind of content, the run context
every stage receives, and what a progress stage counts."""

from __future__ import annotations

import hashlib

import pytest

from SAM2FewShotLib.common import digests
from SAM2FewShotLib.common.context import RunContext
from SAM2FewShotLib.common.errors import Cancelled
from SAM2FewShotLib.common.progress import register_stage, stage_unit


def test_one_digest_per_kind_of_content(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"alpha")
    b.write_bytes(b"beta")
    assert digests.file_digest(a) == hashlib.sha256(b"alpha").hexdigest()
    assert digests.file_digest(a, "md5") == hashlib.md5(b"alpha").hexdigest()  # a checksum someone published
    both = digests.files_digest([a, b])
    assert both == digests.combined_digest([digests.file_digest(a), digests.file_digest(b)])
    assert both != digests.files_digest([b, a])  # in order
    folder = tmp_path / "series"
    folder.mkdir()
    (folder / "2.dcm").write_bytes(b"beta")
    (folder / "1.dcm").write_bytes(b"alpha")
    assert digests.files_digest([folder]) == digests.files_digest([folder / "1.dcm", folder / "2.dcm"])
    assert digests.json_digest({"b": 1, "a": [2]}) == digests.json_digest({"a": [2], "b": 1})  # key order
    assert len(digests.json_digest({"a": 1}, 16)) == 16 and len(digests.text_digest("x", 32)) == 32
    assert digests.bytes_digest(b"al", b"pha") == hashlib.sha256(b"alpha").hexdigest()


def test_the_run_context_reports_and_stops_on_cancel():
    seen, cancelled = [], [False]
    context = RunContext(lambda *a: seen.append(a), lambda: cancelled[0], (2, 5))
    context.report("encode query", 1, 4)
    context.check_cancelled()
    progress = context.cancellable_progress()
    progress("embed library", 1, 2)
    cancelled[0] = True
    with pytest.raises(Cancelled):
        progress("embed library", 2, 2)
    with pytest.raises(Cancelled):
        context.check_cancelled()
    assert seen == [("encode query", 1, 4), ("embed library", 1, 2)] and context.frame_range == (2, 5)
    quiet = RunContext()  # nobody listens, nothing cancels
    quiet.report("fuse labels", 0, 1)
    quiet.check_cancelled()
    quiet.cancellable_progress()("fuse labels", 1, 1)


def test_each_stage_says_what_it_counts():
    assert register_stage(1, 4) == "register support 2/4" and stage_unit(register_stage(1, 4)) == "step"
    assert stage_unit("encode query") == "slice" and stage_unit("embed library") == "case"
    assert stage_unit("download") == "B" and stage_unit("something new") == "step"
