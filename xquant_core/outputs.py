"""What a run writes: checked before any expensive work, written atomically.

A run writes the model ``<prefix>.onnx`` and, beside it, ``<prefix>_report.md``, its chart
``<prefix>_report.png`` and auto-precision's ``<prefix>_custom_setting.json``. Before the
quantization starts, :func:`check_not_read` makes sure none of them is a file the run reads
(``-o data/list.txt`` used to replace the calibration list with the model) and
:func:`check_folder` that the output folder exists or can be made and takes a file. :func:`write_bytes_atomically`
writes through a temporary file and a rename: a full disk or a read-only folder is an error
naming the OS's reason, the old file survives and no temporary file is left. A run's files are
written together (:func:`all_or_nothing`): all of them are replaced, or none.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import errno
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from .errors import XQuantError


class OutputError(XQuantError):
    """The output cannot be written where the config or ``-o`` says (exit 2)."""


def derived_paths(out_path: Path) -> dict[Path, str]:
    """Every file a run may write, with what it is."""
    stem = out_path.stem
    return {
        out_path: "the output model",
        out_path.with_name(f"{stem}_report.md"): "the analysis report",
        out_path.with_name(f"{stem}_report.png"): "the analysis chart",
        out_path.with_name(f"{stem}_custom_setting.json"): "the custom_setting file",
    }


def check_not_read(out_path: Path, reads: Mapping[Path, str], also_writes: Mapping[Path, str] | None = None) -> None:
    """Fail when an output would replace a file the run reads (``reads``: path -> what it is); the
    caller's ``also_writes`` (e.g. ``--summary-json``) must not be one of the run's outputs either."""
    read = {_key(path): what for path, what in reads.items()}
    writes, also_writes = derived_paths(out_path), also_writes or {}
    for path, what in also_writes.items():
        clash = next((other for target, other in writes.items() if _key(target) == _key(path)), None)
        if clash is not None:
            raise OutputError(f"{what} {path} is {clash}, which this run writes: choose another path for it")
    for path, what in {**writes, **also_writes}.items():
        if _key(path) in read:
            advice = "another path for it" if path in also_writes else "another output_prefix or -o"
            raise OutputError(f"{what} {path} is {read[_key(path)]}, which this run reads: choose {advice}")


def output_file(raw: str | os.PathLike, what: str = "the output path") -> Path:
    """``raw`` (``-o``, ``--summary-json``) as the path of a file to write, or an error saying why it
    is not one: empty, a folder by its spelling (``out/``, ``/``, ``..``)."""
    text = os.fspath(raw)
    path = Path(text)
    if not text:
        raise OutputError(f"{what} is empty: give the path of the file to write")
    if text.endswith(("/", os.sep)) or path.name in ("", ".", ".."):
        raise OutputError(f"{what} {text!r} names a folder, not a file: give the path of the file to write")
    return path


def check_folder(out_path: Path, what: str = "the output path", beside: bool = True) -> None:
    """Fail when the output folder cannot take the model: not creatable, not a folder, not
    writable, or the names of the run's files too long for it (``beside``: the report, chart and
    custom_setting files written next to the model too; one of them already a folder fails)."""
    try:
        is_dir = out_path.is_dir()
    except OSError as exc:  # a name too long for the OS, ...
        raise OutputError(f"{what} {out_path}: {_reason(exc)}") from None
    if is_dir:
        kind = ".onnx file" if what == "the output path" else "file"
        raise OutputError(f"{what} {out_path} is a folder: give the path of the {kind} to write")
    folder = out_path.parent
    existing = next((parent for parent in (folder, *folder.parents) if parent.exists()), Path("/"))
    if not existing.is_dir():
        raise OutputError(f"cannot create the output folder {folder}: {existing} is a file, not a folder")
    targets = derived_paths(out_path) if beside else {out_path: what}
    _check_name_lengths(list(targets), existing, what)
    for path, kind in targets.items():
        if path != out_path and path.is_dir():
            raise OutputError(f"{kind} {path} is a folder: move it, or choose another output_prefix or -o")
    try:  # a file in the folder, or a folder where it will be made: tried, then removed
        if existing == folder:
            handle, probe = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".probe", dir=folder)
            os.close(handle)
            os.unlink(probe)
        else:
            os.rmdir(tempfile.mkdtemp(prefix=".xquant-probe-", dir=existing))
    except OSError as exc:
        action = "write to the output folder" if existing == folder else "create the output folder"
        raise OutputError(f"cannot {action} {folder}: {_reason(exc)}") from None


def _check_name_lengths(paths: list[Path], existing: Path, what: str) -> None:
    """The longest name written for ``paths`` (the first is the one the user gave; a temporary
    file while each is written) must fit the folder's file system."""
    try:
        limit = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no limit to read (Windows): the OS's own error later
        return
    given = len(os.fsencode(paths[0].name))
    added = max(len(os.fsencode(f".{path.name}.12345678.tmp.old")) for path in paths) - given
    if given + added > limit:
        raise OutputError(
            f"{what} {paths[0]}: the file name is too long ({given} bytes; at most {limit - added} here, "
            "as a run adds to it for its temporary files" + (" and the report's names)" if len(paths) > 1 else ")")
        )


def files_read(
    model_path: Path | None,
    external_data: Iterable[Path],
    config_source: str,
    lists: Iterable[Path] = (),
    samples: Iterable[Path] = (),
    preprocess_files: Iterable[Path] = (),
) -> dict[Path, str]:
    """The files a run reads, each with what it is (for :func:`check_not_read`); ``external_data``:
    the files holding the weights of the model at ``model_path`` (:func:`.model.read_model`)."""
    reads: dict[Path, str] = {}
    for path in preprocess_files:
        reads[path] = f"the preprocess file {path}"
    for path in samples:
        reads[path] = f"the calibration sample {path}"
    for path in lists:
        reads[path] = f"the calibration list {path}"
    if Path(config_source).is_file():
        reads[Path(config_source)] = f"the config {config_source}"
    if model_path is not None:
        reads.update({path: f"the input model's external data {path}" for path in external_data})
        reads[model_path] = "the input model"
    return reads


def write_bytes_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file + rename: never a partial file. Inside
    :func:`all_or_nothing` the rename waits for the block's end, with the other files'."""
    created = _make_folder(path.parent)
    try:
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        _remove_folders(created)
        raise OutputError(f"cannot write to the output folder {path.parent}: {_reason(exc)}") from None
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
    except OSError as exc:
        _remove(tmp)
        _remove_folders(created)
        raise OutputError(f"cannot write {path}: {_reason(exc)}" + _unchanged(path)) from None
    except BaseException:
        _remove(tmp)
        _remove_folders(created)
        raise
    pending = _pending.get()
    if pending is not None:
        pending.append(_Staged(path, tmp, created))
    else:
        _commit([_Staged(path, tmp, created)])


@contextlib.contextmanager
def all_or_nothing() -> Iterator[None]:
    """Within the block, :func:`write_bytes_atomically` writes each file beside its target and the
    block's end puts them all in place, or none: a run writes its model, report, chart and
    summary together, and a failure at any point (a full disk, an old file that cannot be
    replaced, an error, Ctrl-C) leaves every previous file as it was and no new one. Nested
    blocks join the outermost."""
    if _pending.get() is not None:
        yield
        return
    staged: list[_Staged] = []
    token = _pending.set(staged)
    try:
        yield
    except BaseException:
        _discard(staged)
        raise
    finally:
        _pending.reset(token)
    _commit(staged)


@dataclasses.dataclass(frozen=True)
class _Staged:
    target: Path
    tmp: str
    created: list[Path]  # the folders made for it, removed again if it is discarded


_pending: contextvars.ContextVar[list[_Staged] | None] = contextvars.ContextVar("xquant_pending", default=None)


#: the files the last commit put in place, since :func:`forget_written` (the command line says
#: whether an interrupt came before or after them)
_written: list[Path] = []


def written() -> list[Path]:
    return list(_written)


def forget_written() -> None:
    _written.clear()


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block ends: the renames of a commit are never cut in the
    middle. Python runs signal handlers in the main thread whichever thread the OS gives the
    signal to, so there the handlers are swapped for ones that only note it; it is raised again
    once the block is over. Elsewhere (a library's worker thread) nothing is changed."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    wanted = (signal.SIGINT, signal.SIGTERM)
    previous = {number: signal.signal(number, lambda got, frame: noted.append(got)) for number in wanted}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
    for got in dict.fromkeys(noted):
        signal.raise_signal(got)


def _commit(staged: list[_Staged]) -> None:
    with _signals_held():  # an interrupt held back comes after the files are in place and recorded
        _commit_now(staged)
        _written[:] = [item.target for item in staged]


def _commit_now(staged: list[_Staged]) -> None:
    """Put the staged files in place: the old ones are moved aside first (an old file that cannot
    be replaced fails here, before anything changed), then the new ones renamed in, then the
    old ones deleted; on a failure everything is moved back."""
    for item in staged:  # a folder where a file goes would be moved aside, and lost from sight
        if os.path.isdir(item.target) and not os.path.islink(item.target):
            _discard(staged)
            raise OutputError(f"cannot write {item.target}: it is a folder")
    if len(staged) == 1:  # one file: the rename alone is atomic
        item = staged[0]
        try:
            os.replace(item.tmp, item.target)
        except OSError as exc:
            _discard(staged)
            raise OutputError(f"cannot write {item.target}: {_reason(exc)}" + _unchanged(item.target)) from None
        return
    aside: list[tuple[Path, str]] = []
    placed: list[Path] = []
    current = None
    try:
        for item in staged:
            current = item.target
            if os.path.lexists(item.target):
                backup = f"{item.tmp}.old"
                os.replace(item.target, backup)
                aside.append((item.target, backup))
        for item in staged:
            current = item.target
            os.replace(item.tmp, item.target)
            placed.append(item.target)
    except BaseException as exc:
        stranded = _roll_back(staged, placed, aside)
        if not isinstance(exc, OSError):
            raise
        where = f" (the previous {', '.join(stranded)} could not be put back)" if stranded else _unchanged(current)
        raise OutputError(f"cannot write {current}: {_reason(exc)}{where}") from None
    for _, backup in aside:
        _remove(backup)


def _roll_back(staged: list[_Staged], placed: list[Path], aside: list[tuple[Path, str]]) -> list[str]:
    """Undo a commit cut short: the new files removed, the old ones moved back, the temporary
    ones deleted. Returns "file (kept as backup)" for each old file that could not be moved back."""
    for target in placed:
        _remove(str(target))
    stranded = []
    for target, backup in reversed(aside):
        try:
            os.replace(backup, target)
        except OSError:
            stranded.append(f"{target} (kept as {backup})")
    _discard(staged)
    return stranded


def _discard(staged: list[_Staged]) -> None:
    for item in staged:
        _remove(item.tmp)
    for item in reversed(staged):
        _remove_folders(item.created)


def _make_folder(folder: Path) -> list[Path]:
    """Make ``folder`` and its missing parents; return those made (innermost first)."""
    missing = [parent for parent in (folder, *folder.parents) if not parent.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder {folder}: {_reason(exc)}") from None
    return missing


def _remove_folders(folders: list[Path]) -> None:
    for folder in folders:  # innermost first; a folder something else now holds stays
        try:
            folder.rmdir()
        except OSError:
            pass


def _unchanged(path) -> str:
    return " (the previous file is unchanged)" if path is not None and os.path.lexists(path) else ""


def _reason(exc: OSError) -> str:
    return exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))


def _key(path: Path) -> str:
    return os.path.normcase(os.path.realpath(path))


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
