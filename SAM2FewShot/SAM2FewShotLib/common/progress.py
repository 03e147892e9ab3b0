"""The progress callback every engine stage takes: progress(stage, done, total). Imports nothing heavy."""

from typing import Callable

ProgressFn = Callable[[str, int, int], None]
