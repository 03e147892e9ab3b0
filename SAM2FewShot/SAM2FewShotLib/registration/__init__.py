"""Registering support cases to a query with SimpleITK (rigid, affine, B-spline) and fusing their
warped labels (majority, STAPLE, similarity-weighted). CPU only, no torch: the weight-free
registration method and the guided method's registration prior are built on it. Imports ``io``
and ``common``.
"""
