"""The panel's first use: Python packages and SAM2 weights, each asked for before anything is installed.

Qt and Slicer here (dialogs, cursor, timers); what to install and how is SAM2FewShotLib.slicer.install.
The question is always asked under a normal cursor (a busy cursor over a question reads as "wait", not
"answer me"), and the panel is locked from the moment pip starts until it ends: its states are refreshed
from inside the install lock (install.ensure_installed's on_start), not only before and after.
"""

import qt
import slicer

from SAM2FewShotLib.methods.registry import get_method
from SAM2FewShotLib.slicer import install, panel

TITLE = "SAM2FewShot"


def confirm(question) -> bool:
    """OK/Cancel, with a normal cursor while the user reads the question (and the busy one back after)."""
    busy = qt.QApplication.overrideCursor() is not None
    if busy:
        qt.QApplication.restoreOverrideCursor()
    try:
        return slicer.util.confirmOkCancelDisplay(question, windowTitle=f"{TITLE} setup")
    finally:
        if busy:
            qt.QApplication.setOverrideCursor(qt.Qt.WaitCursor)


class FirstUse:
    """Packages and weights for the widget: ``ensureReady`` before a run, the download and import buttons."""

    def __init__(self, widget):
        self.widget = widget
        self._download = None  # (dialog, timer, download) while the weights download

    @property
    def logic(self):
        return self.widget.logic

    def ensureDependencies(self, needsModel) -> bool:
        """Install what is missing once the user agrees (busy cursor and locked panel while pip runs)."""
        try:
            with slicer.util.WaitCursor():
                return self.logic.ensureDependencies(needsModel, confirm, onStart=self.widget.updateWidgetStates)
        finally:
            self.widget.updateWidgetStates()

    def ensureReady(self, choices, then) -> bool:
        """Packages and weights for ``choices``; False stops (a download resumes with ``then``). Random
        weights (the self-test's) need no weights file: nothing is checked or downloaded for them."""
        method = get_method(choices.method)
        ready = self.ensureDependencies(method.needs_model)
        if not ready or not method.needs_model:
            return ready
        if choices.random_weights or self.logic.isModelCached(choices.model):
            return True
        if confirm(f"The weights of {choices.model} are not on this computer yet. Download them from Hugging Face "
                   f"into {self.logic.cacheFolder()}?\n\nWithout internet: use Import checkpoint file."):
            self.startModelDownload(then)
        return False

    def startModelDownload(self, then=None):
        """The weights in a background thread, with a progress dialog polled by a timer (cancellable)."""
        if not self.ensureDependencies(True):  # the download needs huggingface_hub
            return
        name = self.widget._parameterNode.model
        dialog = qt.QProgressDialog(f"Downloading {name} weights...", "Cancel", 0, 100, slicer.util.mainWindow())
        dialog.setWindowModality(qt.Qt.WindowModal)
        dialog.minimumDuration = 0
        download, timer = install.BackgroundDownload(name), qt.QTimer()

        def poll():
            if dialog.wasCanceled:
                download.cancel()
            dialog.setValue(int(100 * download.fraction))
            dialog.setLabelText(panel.progress_text("download", download.done, download.total))
            if download.finished:
                timer.stop()
                dialog.close()
                self._download = None
                self.widget.updateWidgetStates()
                if download.error is not None:
                    slicer.util.errorDisplay(panel.panel_message(str(download.error)), windowTitle=f"{TITLE} download")
                elif then is not None:
                    self.widget.guarded(then)

        timer.connect("timeout()", poll)
        timer.start(200)
        self._download = (dialog, timer, download)  # kept alive until it finishes

    def importCheckpoint(self):
        name = self.widget._parameterNode.model
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), f"Import a checkpoint file as {name}", "",
                                              "PyTorch checkpoints (*.pt *.pth);;All files (*)")
        if path:
            with slicer.util.WaitCursor():
                target = self.widget.guarded(self.logic.importCheckpoint, name, path)
            if target:
                self.widget.addLog(f"Imported {path} as {name} ({target})")
            self.widget.updateWidgetStates()
