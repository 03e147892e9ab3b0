"""Foundations every layer may use: user-facing errors, the progress callback type, files written
atomically (and their hashes), and the per-user cache folder. Imports nothing from the package and
nothing heavy (no numpy, torch or SimpleITK), so the Slicer panel can use it before first-use setup.
"""
