"""The segmentation methods, each a module that says how it conditions the SAM2 core (or, for
registration, replaces it), registered in ``registry.py``. A method module holds its parameter
dataclass ``Params`` and ``run(inputs, params)``; the Runner (run/) calls it. Imports ``library``,
``support``, ``sam2``, ``registration``, ``io`` and ``common``.
"""
