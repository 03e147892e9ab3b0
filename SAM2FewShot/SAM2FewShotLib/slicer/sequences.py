"""Runs on a 4D sequence's proxy volume: the time point a run was made on, and whether it is still shown.

In Slicer a sequence (vtkMRMLSequenceNode) is browsed through a vtkMRMLSequenceBrowserNode, which
copies the selected item into one proxy node; the proxy is the same MRML node for every time point.
So checking that the query node is still in the scene says nothing about which time point it shows:
a run started on a proxy records the browser, the sequence and the selected item, and its result
(and a Refine of it) is accepted only while the browser still shows that item.

Rule: when the browser has moved, the result is refused in one sentence, never written elsewhere.
Writing it into the recorded item instead is not safe: a sequence's items live in the sequence's
own internal scene (vtkMRMLSequenceNode::GetSequenceScene), without the display nodes, subject
hierarchy and undo entries the insertion works with, and a non-sequence output segmentation has
no "item" at all. Going back to the time point and running again costs the user one click.

Only MRML calls (no Qt, no slicer module logic), so it is tested headless on slicer-core.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..common.errors import InputError
from .result_segments import same_node

BROWSER_CLASS = "vtkMRMLSequenceBrowserNode"


@dataclass(frozen=True)
class Frame:
    """The time point a run was started on: which browser showed which item of which sequence."""

    browser: object  # vtkMRMLSequenceBrowserNode
    sequence: object  # vtkMRMLSequenceNode whose item the proxy showed
    item: int  # the browser's selected item number, 0-based
    index_value: str  # the item's index value (e.g. "0.5"): an item inserted before it shifts the number

    def label(self) -> str:
        """As the user finds it in the Sequences toolbar, e.g. "time point 2 (time = 0.5 s)"."""
        name, unit = self.sequence.GetIndexName() or "index", self.sequence.GetIndexUnit() or ""
        return f"time point {self.item + 1} ({name} = {self.index_value}{' ' + unit if unit else ''})"


def browser_of(node):
    """The sequence browser that shows ``node`` as a proxy, or None (not a sequence's proxy).

    Searched in the scene rather than through vtkSlicerSequencesLogic::GetFirstBrowserNodeForProxyNode,
    so no module logic is needed; IsProxyNodeID is the browser's own test."""
    scene = node.GetScene() if node is not None else None
    if scene is None:
        return None
    browsers = scene.GetNodesByClass(BROWSER_CLASS)
    for n in range(browsers.GetNumberOfItems()):
        browser = browsers.GetItemAsObject(n)
        if browser.IsProxyNodeID(node.GetID()) and browser.GetSequenceNode(node) is not None:
            return browser
    return None


def frame_of(node) -> Frame | None:
    """The time point ``node`` shows now when it is a sequence's proxy, else None; InputError when no
    single time point is shown (playing, or an empty sequence)."""
    browser = browser_of(node)
    if browser is None:
        return None
    if browser.GetPlaybackActive():
        raise InputError("the sequence is playing: stop it at the time point to segment, then Apply")
    sequence, item = browser.GetSequenceNode(node), browser.GetSelectedItemNumber()
    if not 0 <= item < sequence.GetNumberOfDataNodes():
        raise InputError("the sequence browser shows no time point: select one, then Apply")
    return Frame(browser, sequence, item, sequence.GetNthIndexValue(item))


def shown(frame: Frame, node) -> bool:
    """True while the browser still shows the recorded item of the recorded sequence in ``node``."""
    browser = frame.browser
    if not same_node(node.GetScene(), browser) or not browser.IsProxyNodeID(node.GetID()):
        return False
    sequence, item = browser.GetSequenceNode(node), browser.GetSelectedItemNumber()
    return (sequence is frame.sequence and item == frame.item and 0 <= item < sequence.GetNumberOfDataNodes()
            and sequence.GetNthIndexValue(item) == frame.index_value)


def check_shown(frame: Frame | None, node, again: str = "run again") -> None:
    """InputError in one sentence when a run's result arrives and its time point is no longer the one
    shown (None: not a sequence, nothing to check)."""
    if frame is not None and not shown(frame, node):
        raise InputError(f"the sequence was moved to another time point while the segmentation was computed; "
                         f"go back to {frame.label()} and {again}")


def check_refine_frame(frame: Frame | None, node) -> None:
    """InputError before a Refine when the browser shows another time point than the result it refines:
    the corrections were drawn over another frame's image."""
    if frame is not None and not shown(frame, node):
        raise InputError(f"the sequence shows another time point than the last result; go back to {frame.label()}, "
                         f"where it was made, and Refine again")


def time_point_of(frame: Frame | None) -> tuple[str, str] | None:
    """(index value, label) of a run's time point, for its own output segmentation; None off a sequence."""
    return None if frame is None else (frame.index_value, frame.label())
