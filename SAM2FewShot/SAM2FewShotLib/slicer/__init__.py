"""The Slicer module's logic without Qt: the panel's choices and jobs, run control on the worker, scene
reading and result insertion, first-use install, and the MRML bridge (the only modules that touch
Slicer's MRML and VTK classes). Imports ``run`` and below; never Qt, never slicer.util.
"""
