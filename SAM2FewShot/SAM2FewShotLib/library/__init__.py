"""Support libraries for retrieval: the labelled cases of a folder or list file, the on-disk embedding
index of their slices (incremental, content-hashed), and keeping it in sync with the chosen
features. Imports ``support``, ``sam2``, ``io`` and ``common``.
"""
