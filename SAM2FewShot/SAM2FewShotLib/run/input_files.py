"""Every file a request reads, with the words that name it: what no output of the run may replace.

An input is more than the path given: a label file's names and colours live in a JSON sidecar, a
DICOM query is a folder of files, a detached header points at its data file, and a library is a
list file, its cases' files and its embedding index. The runner's checks (run/runner.check_request)
look at each of them, and run/outputs.check_outputs refuses an output that would replace any, so
the CLI, the worker, batch and the bench all get the same answer from this one function.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..common.paths import check_path_text, check_readable
from ..io.headers import data_file_names
from ..io.volume_io import SEG_NRRD, image_suffix, sidecar_path
from .request import Request


@dataclass(frozen=True)
class InputFile:
    """One file (or, with ``folder``, a folder whose whole content) the run reads.

    ``what`` names it in a message; ``given`` says it is a path the request names itself (an output
    on it "is also an input"), not a file that comes with one (an output on it "would replace" it).
    """

    path: Path
    what: str
    given: bool = False
    folder: bool = False


def given_inputs(request: Request) -> list[tuple[str, str]]:
    """(path, what it is) of every path the request names itself: the query, prompts, supports, library."""
    named = [(request.query, "the query"), (request.prompt_labels, "the prompt labels"),
             (request.prompts, "the prompts file"), (request.library, "the library")]
    named += [pair for image, labels in request.supports
              for pair in ((image, "the support image"), (labels, "the support labels"))]
    return [(path, what) for path, what in named if path is not None]


def input_files(request: Request) -> list[InputFile]:
    """Every file the request reads: its inputs, their sidecars and data files, DICOM folders' files,
    a library's list, cases and index folders. A library that cannot be opened raises its InputError."""
    files: list[InputFile] = []
    for path, what in given_inputs(request):
        if what == "the library":
            files += library_files(path)
        elif what in ("the prompt labels", "the support labels"):
            files += label_files(path, what)
        elif what == "the prompts file":
            files.append(InputFile(Path(path), what, given=True))
        else:
            files += volume_files(path, what)
    return files


def check_input_files(request: Request) -> list[InputFile]:
    """Every file the request reads (run/input_files.py), each a UTF-8 path to a regular file (or folder)
    that may be read: otherwise one line with the real reason, before any reader (ITK) sees it."""
    given = given_inputs(request)
    for path, what in given:
        check_path_text(path, what)
    for path, what in given:
        check_readable(path, what)
    files = input_files(request)
    for file in files:
        if not file.folder and not file.given and _exists(file.path):
            check_path_text(file.path, file.what)
            check_readable(file.path, file.what)
    return files


def _exists(path: Path) -> bool:
    """Whether to look at a file that comes with an input (a sidecar or data file may well be absent)."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return True  # check_readable says what is wrong with it


def volume_files(path, what: str, given: bool = True) -> list[InputFile]:
    """A volume file and the data file its detached header names, or a DICOM folder and its files."""
    path = Path(path)
    if path.is_dir():
        return [InputFile(f, f"a file of the DICOM folder {path} ({what})") for f in sorted(path.iterdir())
                if f.is_file()]
    files = [InputFile(path, what, given)]
    files += [InputFile(path.parent / name, f"the data file of {what} {path}") for name in data_file_names(path)]
    return files


def label_files(path, what: str, given: bool = True) -> list[InputFile]:
    """A label file and its names-and-colours sidecar (beside the name given, and beside a link's target)."""
    path = Path(path)
    files = volume_files(path, what, given)
    if image_suffix(path) != SEG_NRRD:
        sidecars = dict.fromkeys([sidecar_path(path), sidecar_path(path.resolve())])
        files += [InputFile(s, f"the names-and-colours sidecar of {what} {path}") for s in sidecars]
    return files


def library_files(path) -> list[InputFile]:
    """A library's list file, its cases' files (sidecars included) and its index folders (beside it and
    in the user cache): an output on any of them would damage the library for every later run."""
    from ..library.cases import open_library

    library = open_library(Path(path))
    what = f"the library {path}"
    files = []
    if library.list_file is not None:
        files.append(InputFile(library.list_file, f"the list file of {what}", given=library.list_file == Path(path)))
    for case in library.cases:
        files += volume_files(case.image, f"an image of {what}", given=False)
        files += label_files(case.labels, f"a label file of {what}", given=False)
    files += [InputFile(index, f"the embedding index of {what}", folder=True) for index in library.index_locations()]
    return files
