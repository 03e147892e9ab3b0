"""The ``sam2fewshot`` command: argument parsing, and translating each command into engine calls
(``segment`` builds a Request for the Runner). The top layer: may import every other package.
"""
