"""The panel's "Review a cohort" section: widgets and wiring only.

What it does lives in SAM2FewShotLib.slicer.review (CohortReview, LibraryAdder: tested headless on
Slicer's real MRML); here, clicks become calls and every outcome, good or bad, becomes one sentence in
the section's status line.
"""

import logging
import traceback

import qt
import slicer

from SAM2FewShotLib.slicer import panel, review

COLUMNS = ("Case", "Status", "Score", "Why")
STEP_BUTTONS = ("nextFlaggedButton", "acceptButton", "rejectButton", "acceptCorrectedButton")
POLL_MS = 200


class ReviewSection:
    """One cohort folder at a time, one of its cases in the scene; *Add to library* runs on a worker
    of its own (the embedding never runs in Slicer's process)."""

    def __init__(self, ui, clientFactory, modelOptions):
        self.ui = ui
        self.modelOptions = modelOptions  # () -> ModelOptions: the panel's model, for a SAM2 library index
        self.cohort = None  # review.CohortReview
        self.adder = review.LibraryAdder(clientFactory)
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MS)
        self._timer.connect("timeout()", self.pollLibraryAdd)

    def setup(self):
        table = self.ui.reviewTableWidget
        table.setColumnCount(len(COLUMNS))
        table.setHorizontalHeaderLabels(list(COLUMNS))
        # ctkPathLineEdit has no editingFinished; its inner line edit does (CTK's ctkPathLineEdit.h).
        self.ui.reviewFolderLineEdit.findChild(qt.QLineEdit).connect("editingFinished()", self.onFolderEdited)
        self.ui.reviewFolderLineEdit.connect("currentPathChanged(QString)", self.onFolderBrowsed)
        self.ui.reviewTableWidget.connect("cellClicked(int,int)", self.onCaseClicked)
        self.ui.nextFlaggedButton.connect("clicked(bool)", lambda: self.step(self.cohort.show_next_flagged))
        self.ui.acceptButton.connect("clicked(bool)", lambda: self.decide(self.cohort.decide, "accepted"))
        self.ui.rejectButton.connect("clicked(bool)", lambda: self.decide(self.cohort.decide, "rejected"))
        self.ui.acceptCorrectedButton.connect("clicked(bool)", lambda: self.decide(self.cohort.accept_corrected))
        self.ui.addToLibraryButton.connect("clicked(bool)", lambda: self.step(self.startLibraryAdd))
        self.updateButtons()

    def cleanup(self):
        self._timer.stop()
        self.adder.shutdown()

    def onSceneClose(self):
        """The scene takes the loaded case's nodes with it: the case is no longer loaded."""
        if self.cohort is not None:
            self.cohort.loaded = None
        self.updateButtons()

    # --- the folder and its cases ------------------------------------------------------------------

    def onFolderEdited(self):
        self.openFolder(self.ui.reviewFolderLineEdit.currentPath)

    def onFolderBrowsed(self, path):
        if not self.ui.reviewFolderLineEdit.findChild(qt.QLineEdit).hasFocus():  # chosen with Browse, not typed
            self.openFolder(path)

    def openFolder(self, folder):
        """List the folder's cases (the previous cohort's loaded case leaves the scene)."""
        if self.cohort is not None and str(self.cohort.folder) == folder:
            return
        if self.cohort is not None:
            self.cohort.unload()
        self.cohort = None
        opened = self.step(review.CohortReview.open, slicer.mrmlScene, folder)
        if opened is not None:
            self.cohort = opened
            self.setStatus(f"{len(opened.rows)} cases; click one to load it.")
        self.fillTable()

    def fillTable(self):
        table = self.ui.reviewTableWidget
        rows = self.cohort.rows if self.cohort is not None else []
        table.setRowCount(len(rows))
        for number, row in enumerate(rows):
            score = "" if row.score is None else f"{row.score:.2f}"
            why = row.error or "; ".join(row.reasons)
            for column, value in enumerate((row.case, row.status, score, why)):
                item = qt.QTableWidgetItem(value)
                item.setData(qt.Qt.UserRole, row.case)
                item.setToolTip(why)
                table.setItem(number, column, item)
        table.resizeColumnsToContents()
        self.updateButtons()

    def onCaseClicked(self, row, column):
        item = self.ui.reviewTableWidget.item(row, 0)
        if item is None or self.cohort is None:
            return
        with slicer.util.WaitCursor():
            loaded = self.step(self.cohort.load, item.data(qt.Qt.UserRole))
        if loaded is not None:
            slicer.util.resetSliceViews()  # fit the views to the case just loaded
            flagged = len(loaded.flagged)
            self.setStatus(f"Case {loaded.case} loaded ({flagged} flagged slice{'s' if flagged != 1 else ''}).")
        self.updateButtons()

    # --- decisions --------------------------------------------------------------------------------

    def decide(self, action, *args):
        """A decision written into the folder; the table shows the new order."""
        if self.step(action, *args) is not None:
            self.fillTable()

    def startLibraryAdd(self):
        image, labels, name = self.cohort.library_case()
        self.adder.start(self.ui.reviewLibraryLineEdit.currentPath, image, labels, name, self.modelOptions())
        self._timer.start()
        self.updateButtons()
        return f"Adding case {name} to the library in the background..."

    def pollLibraryAdd(self):
        try:
            outcome = self.adder.poll()
        except Exception as exc:  # noqa: BLE001 - the worker could not be reached: one sentence
            self.adder.job_id, outcome = None, (False, review.review_message(exc))
        if outcome is not None:
            self._timer.stop()
            self.setStatus(outcome[1])
            self.updateButtons()

    # --- feedback ----------------------------------------------------------------------------------

    def step(self, action, *args):
        """Run a review step; its sentence (when it returns one) or its error goes to the status line."""
        try:
            result = action(*args)
        except Exception as exc:  # noqa: BLE001 - one sentence; the details in the log
            if not isinstance(exc, review.SAM2FewShotError):
                logging.error(traceback.format_exc())
            self.setStatus(review.review_message(exc))
            return None
        if isinstance(result, str):
            self.setStatus(result)
        return result

    def setStatus(self, text):
        self.ui.reviewStatusLabel.text = panel.panel_message(text) if text else ""

    def updateButtons(self):
        loaded = self.cohort is not None and self.cohort.loaded is not None
        for name in STEP_BUTTONS:
            getattr(self.ui, name).enabled = loaded
        self.ui.addToLibraryButton.enabled = loaded and not self.adder.is_running
