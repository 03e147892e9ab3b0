"""The worker's request loop in this process (the subprocess, its pipes and signals are test_worker.py): every
line gets one event, a job one result or one error line, and a failure never ends the loop."""

from __future__ import annotations

import io
import json
from pathlib import Path

from phantoms import phantom
from SAM2FewShotLib.io.volume_io import write_labels, write_volume
from SAM2FewShotLib.run import protocol
from SAM2FewShotLib.run.worker import Emitter, Worker, causes, error_message, is_out_of_memory


def _events(stream: io.BytesIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().decode().splitlines()]


def test_each_request_line_gets_its_event_and_a_bad_one_never_stops_the_loop(tmp_path):
    image, labels = phantom((8, 32, 32), spacing=(1.0, 1.0, 3.0))
    write_volume(image, tmp_path / "q.nrrd")
    write_volume(image, tmp_path / "s.nrrd")
    write_labels(labels, tmp_path / "s_label.nii.gz")
    stream = io.BytesIO()
    worker = Worker(Emitter(stream))
    job = {"type": "job", "id": "reg", "method": "registration", "query": str(tmp_path / "q.nrrd"),
           "supports": [[str(tmp_path / "s.nrrd"), str(tmp_path / "s_label.nii.gz")]],
           "out": str(tmp_path / "r.nii.gz"), "report": str(tmp_path / "r_report.json")}
    lines = [b"not json\n", b"\n", json.dumps({**job, "id": "bad", "query": str(tmp_path / "missing.nrrd")}).encode(),
             json.dumps(job).encode()]
    assert all(worker.handle(line) for line in lines)  # none of them stops the worker
    assert worker.handle(protocol.encode({"type": "shutdown"})) is False
    events = _events(stream)
    assert [(e["event"], e.get("id")) for e in events if e["event"] != "progress"] == [
        ("error", None), ("error", "bad"), ("result", "reg")]
    assert events[0]["message"].startswith("invalid job: not a JSON line")
    assert "does not exist" in events[1]["message"] and "\n" not in events[1]["message"]
    assert any(e["event"] == "progress" and e["id"] == "reg" for e in events)
    assert ((tmp_path / "r.nii.gz").is_file()
            and json.loads((tmp_path / "r_report.json").read_text())["method"] == "registration")


def test_the_panels_input_notes_travel_with_the_job_into_the_report(tmp_path):
    """What the panel did to a volume before writing it (a DICOM acquisition transform hardened,
    slicer/mrml_volume.py) reaches the report's input_notes, first, through the protocol."""
    from SAM2FewShotLib.slicer.panel import PanelChoices, build_job

    image, labels = phantom((8, 32, 32), spacing=(1.0, 1.0, 3.0))
    write_volume(image, tmp_path / "q.nrrd")
    write_volume(image, tmp_path / "s.nrrd")
    write_labels(labels, tmp_path / "s_label.nii.gz")
    note = {"volume": "CT", "transform": "CT acquisition transform", "rule": "resampled", "slices": 8}
    job = build_job("reg", PanelChoices(method="registration"), tmp_path, tmp_path / "q.nrrd",
                    supports=[(tmp_path / "s.nrrd", tmp_path / "s_label.nii.gz")], input_notes=[note])
    assert protocol.parse_request(protocol.encode(job.to_message())) == job
    plain = build_job("p", PanelChoices(method="registration"), tmp_path, tmp_path / "q.nrrd")
    assert "input_notes" not in plain.to_message()  # an ordinary job's message is unchanged
    stream = io.BytesIO()
    worker = Worker(Emitter(stream))
    assert worker.handle(protocol.encode(job.to_message()))
    assert worker.handle(protocol.encode({**job.to_message(), "id": "bad", "input_notes": ["text"]}))
    events = [e for e in _events(stream) if e["event"] in ("result", "error")]
    assert [(e["event"], e["id"]) for e in events] == [("result", "reg"), ("error", "bad")]
    assert "input_notes must be a list of objects" in events[1]["message"]
    assert json.loads(Path(job.report).read_text())["input_notes"][0] == note


def test_errors_become_one_line_and_out_of_memory_is_named():
    try:
        try:
            raise MemoryError()
        except MemoryError as exc:
            raise RuntimeError("while encoding") from exc
    except RuntimeError as wrapped:
        chain = causes(wrapped)
        assert [type(e) for e in chain] == [RuntimeError, MemoryError]
        assert any(is_out_of_memory(e) for e in chain)
        assert "out of memory" in error_message(wrapped) and "\n" not in error_message(wrapped)
    assert not is_out_of_memory(ValueError("no"))
