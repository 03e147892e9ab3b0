"""The SAM2 Segment Editor effect (Qt side; its logic is SAM2FewShotLib.slicer.click_session).

Slicer loads a scripted effect from its file (qSlicerSegmentEditorScriptedEffect::setPythonSource: the
folder names the module, the file the class) and finds the class here when this package is imported.
The module registers the effect once Slicer has started (SAM2FewShot.py: startupCompleted()).
"""

import os

from .SegmentEditorSAM2Effect import EFFECT_NAME, SegmentEditorSAM2Effect  # noqa: F401 - setPythonSource finds it here

EFFECT_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "SegmentEditorSAM2Effect.py")


def registerEffect():
    """Register the SAM2 effect with the Segment Editor's effect factory (a second call changes nothing: the
    factory keeps the first effect of a name), as Slicer's SegmentEditorEffects.registerEffects does."""
    import qSlicerSegmentationsEditorEffectsPythonQt as effects

    instance = effects.qSlicerSegmentEditorScriptedEffect(None)
    instance.setPythonSource(EFFECT_FILE.replace("\\", "/"))
    instance.self().register()
