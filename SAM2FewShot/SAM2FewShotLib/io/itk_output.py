"""What ITK says, made fit for a one-line error: its C libraries' own printing kept off the terminal,
and its exception text reduced to the message and its innermost detail, without object addresses."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator

log = logging.getLogger("SAM2FewShotLib.io.volume_io")  # the logger these lines always came from
_ITK_PREFIX = re.compile(r"^(ITK ERROR: \w+\(0x[0-9a-fA-F]+\): |sitk::ERROR: )")
_POINTER = re.compile(r"\s*\(?\b0x[0-9a-fA-F]{6,}\b\)?")  # an object's address: differs every run, means nothing


@contextlib.contextmanager
def native_output_captured() -> Iterator[None]:
    """What the C libraries inside ITK (niftilib, GDCM, ITK's own warnings) print on the process's
    stderr, kept off the terminal: our one-line error says what went wrong. The text is logged at
    INFO level (the CLI shows it with --verbose)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable stderr: nothing to keep clean
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode("utf-8", errors="replace").strip()
            if text:
                log.info("ITK: %s", " ".join(text.split()))


def itk_reason(exc: RuntimeError) -> str:
    """The useful part of a multi-line ITK exception: its message and its innermost detail."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if lines and lines[0].startswith("Exception thrown"):
        lines = lines[1:]  # names the C++ source file, not the problem
    lines = [_POINTER.sub("", _ITK_PREFIX.sub("", line)) for line in lines]
    if not lines:
        return "not a readable image"
    detail = f" ({lines[-1]})" if len(lines) > 1 else ""
    return lines[0].rstrip(":") + detail
