"""The Slicer module's Qt side beyond the Widget: its Logic and parameter node, and its self-test.

May import Qt and Slicer's GUI helpers (unlike SAM2FewShotLib, the engine); the module file
SAM2FewShot.py keeps only the module description and the Widget's wiring.
"""
