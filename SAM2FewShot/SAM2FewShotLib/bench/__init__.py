"""Benchmarks: leave-one-out accuracy, time and memory of every method (requests through the Runner),
metrics (Dice, HD95, surface Dice), the peer-style JPEG pipeline speed comparison, memory against
slice count, and the Markdown/JSON/PNG report. Imports ``run`` and below.
"""
