"""The panel's undo history on disk: the last UNDO_DEPTH results, found again after a module reload.

Each Apply's entry is a folder in the cache (cache_dir()/undo/<session>/<number>/) holding the
segments the result replaced or removed, as they were, in one compressed .seg.nrrd written by
Slicer's own storage node (voxels, names, colours, ids, every tag), and a small JSON file with
what the run added and each segment's place and display. The session folder is named after this
Slicer process and the scene object, so a new RunController (a reloaded module) on the same scene
finds the history, and nothing of it lives in Python's memory: the store holds the scene and paths
only. Older entries are pruned as new ones come; a closed scene's history is deleted; other
sessions' histories untouched for a week (a crashed Slicer's) are deleted at the next Apply. No Qt.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from ..common.cache import cache_dir
from .mrml_segments import SegmentSnapshot, restore_segments, snapshot_segment
from .mrml_volume import mrml

UNDO_DEPTH = 5  # K: how many results can be undone, the latest first
SESSION_ENV = "SAM2FEWSHOT_UNDO_SESSION"  # this process's token: survives re-importing the modules
STALE_AFTER_S = 7 * 24 * 3600  # another session's history untouched this long is deleted
_ENTRY, _SEGMENTS = "entry.json", "segments.seg.nrrd"


def undo_root() -> Path:
    return cache_dir() / "undo"


def session_token() -> str:
    """"<pid>-<random>", made once per process and kept in its environment (a module reload keeps it)."""
    token = os.environ.get(SESSION_ENV, "")
    if token.split("-")[0] != str(os.getpid()):  # none yet, or inherited from a parent process
        token = os.environ[SESSION_ENV] = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return token


def address(vtk_object, class_name: str) -> str:
    """The C++ object's address: the same object whichever Python wrapper (module) asks."""
    return vtk_object.GetAddressAsString(class_name).replace("Addr=", "")


class UndoStore:
    """The undo history of one scene, on disk; ``entries()`` reads it there each time."""

    def __init__(self, scene):
        self.scene = scene

    @property
    def folder(self) -> Path:
        return undo_root() / f"{session_token()}-{address(self.scene, 'vtkMRMLScene')}"

    def entries(self) -> list[Path]:
        """The entry folders, oldest first (a half-written one, ending in .tmp, is not an entry)."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if p.is_dir() and p.name.isdigit())

    def push(self, node, created: bool, added: Sequence[str], saved: Sequence[SegmentSnapshot]) -> Path:
        """Record an insertion into ``node``; the oldest entries beyond UNDO_DEPTH are deleted, and so
        are the histories of Slicer sessions that are gone."""
        prune_stale_sessions()
        entries = self.entries()
        number = int(entries[-1].name) + 1 if entries else 1
        final = self.folder / f"{number:06d}"
        partial = final.with_suffix(".tmp")
        partial.mkdir(parents=True, exist_ok=True)
        try:
            if saved:
                write_segments_file(partial / _SEGMENTS, saved)
            meta = {"node_id": node.GetID(), "node": address(node, "vtkMRMLSegmentationNode"), "created": created,
                    "added": list(added), "segments": [{"id": s.segment_id, "index": s.index, "display": s.display}
                                                       for s in saved]}
            (partial / _ENTRY).write_text(json.dumps(meta), encoding="utf-8")
            partial.rename(final)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        for old in [*entries, final][:-UNDO_DEPTH]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def undo(self) -> str:
        """Take the latest entry back into the scene (then delete it); the message."""
        entries = self.entries()
        if not entries:
            return "Nothing to undo."
        entry = entries[-1]
        try:
            return self._apply(entry)
        finally:
            shutil.rmtree(entry, ignore_errors=True)

    def clear(self) -> None:
        """Forget the whole history (the scene is closed: its nodes are gone)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def _apply(self, entry: Path) -> str:
        meta = json.loads((entry / _ENTRY).read_text(encoding="utf-8"))
        node = self.scene.GetNodeByID(meta["node_id"])
        if node is None or address(node, "vtkMRMLSegmentationNode") != meta["node"]:
            return "Nothing to undo: the segmentation is no longer in the scene."
        saved = read_segments_file(entry / _SEGMENTS, meta["segments"]) if meta["segments"] else []
        restore_segments(node, saved, remove=meta["added"])
        if meta["created"] and node.GetSegmentation().GetNumberOfSegments() == 0:
            self.scene.RemoveNode(node)
            return f"Undone: removed '{node.GetName()}', which the run had made."
        return f"Undone: '{node.GetName()}' is as it was before the run."


def write_segments_file(path: Path, saved: Sequence[SegmentSnapshot]) -> None:
    """The snapshots' segments (own layers) in one compressed .seg.nrrd, cropped to their voxels."""
    slicer = mrml()
    holder = slicer.vtkMRMLSegmentationNode()
    for snap in saved:
        segment = slicer.vtkSegment()
        segment.DeepCopy(snap.segment)
        holder.GetSegmentation().AddSegment(segment, snap.segment_id)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(True)
    storage.SetCropToMinimumExtent(True)
    if not storage.WriteData(holder):
        raise OSError(f"could not write the undo data to {path}")


def read_segments_file(path: Path, segments: Sequence[dict]) -> list[SegmentSnapshot]:
    """The snapshots back, each segment on a layer of its own, with its place and display."""
    slicer = mrml()
    scene = slicer.vtkMRMLScene()  # private: the reader makes display nodes, which need a scene
    holder = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(holder):
        raise OSError(f"could not read the undo data in {path}")
    return [SegmentSnapshot(s["id"], s["index"], snapshot_segment(holder, s["id"]).segment, s["display"])
            for s in segments]


def prune_stale_sessions(root: Path | None = None) -> list[Path]:
    """Delete the histories of other Slicer sessions nobody touched for STALE_AFTER_S (a crashed or
    closed Slicer's: a running one touches its own at every Apply and Undo). By age, not by process
    id: asking whether a process runs has side effects on Windows (os.kill), and a number alone can
    name a later process."""
    root = root or undo_root()
    if not root.is_dir():
        return []
    mine, now, removed = session_token(), time.time(), []
    for folder in root.iterdir():
        if folder.name.startswith(mine + "-") or not folder.is_dir():
            continue
        try:
            stale = now - folder.stat().st_mtime > STALE_AFTER_S
        except OSError:
            continue
        if stale:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed
