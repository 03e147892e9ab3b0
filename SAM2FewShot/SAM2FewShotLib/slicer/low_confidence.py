"""The panel's table of slices to check, without Qt: its rows and the result they were listed from.

The table is filled when a run ends, but the result it describes can go away afterwards (a scene close,
an Undo, a newer run): a click on a row then has nowhere to go. So the rows remember their result, a
scene close empties them, and a click on a row of a result that is gone is a message, not an exception
raised in a Qt slot (which the user sees only as a traceback in the Python console).
"""

from __future__ import annotations

from ..common.errors import SAM2FewShotError
from ..run.reports import SliceFlag
from . import result_segments

GONE = "That row belongs to a result that is no longer there (scene closed, undone, or replaced): the list was cleared."


class LowConfidenceRows:
    """Rows of the table, tied to the result (``runs.last``) they came from. ``runs`` is a RunController:
    only its ``scene``, ``last``, ``low_confidence()`` and ``slice_position()`` are used."""

    def __init__(self, runs):
        self.runs = runs
        self.rows: list[SliceFlag] = []
        self._result = None

    def refresh(self) -> list[SliceFlag]:
        """The rows of the current result (none when there is none)."""
        self._result = self.runs.last
        self.rows = self.runs.low_confidence() if self._result is not None else []
        return self.rows

    def reset(self) -> None:
        """Forget the rows (scene close): the table shown must be emptied too."""
        self.rows, self._result = [], None

    def is_current(self) -> bool:
        """Whether the listed result is still the last one and its volume still in the scene."""
        result = self._result
        return (result is not None and result is self.runs.last
                and result_segments.same_node(self.runs.scene, result.query_node))

    def target(self, index: int) -> tuple[tuple[float, float, float] | None, str]:
        """Where a click on the row of slice ``index`` goes (world RAS), or None and why not; a click on a
        gone result's row also clears the rows, so the table can be emptied at once."""
        if not self.is_current():
            self.reset()
            return None, GONE
        try:
            return self.runs.slice_position(index), ""
        except (SAM2FewShotError, IndexError, ValueError) as exc:
            return None, f"Cannot show slice {index}: {exc}"
