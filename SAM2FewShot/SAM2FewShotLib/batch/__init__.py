"""Cohorts: one request template run over many queries, as one job that can stop and resume. Finds
the cases (a folder or a CSV), keeps the manifest of what is done (outputs written atomically,
recorded with a hash of the options), runs the cases on one machine with a warm model and the next
query prefetched, or on a Ray cluster with one warm actor per GPU, and writes the cohort report.
Imports bench (metrics, plots), run and everything below.
"""
