"""Publishing what tlrefusal writes: build it under a temporary name beside the target, then rename.

The one staged-write helper. Every file and folder the tool writes (run-folder artifacts, the download
cache, the demo model, an orthogonalized checkpoint, the organism) goes through `atomic_file`,
`staged_folder` or `staged_files`, so a reader never sees a half-written result and an interrupted write leaves nothing
behind. Temporary files and folders are created private (0600 / 0700); what is published gets the modes
the user's umask gives any new file and folder, so a model written here can be read like one from the hub.
"""
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def atomic_file(path: Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` on a temporary file in `path`'s folder, then rename it to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextmanager
def staged_folder(final: Path, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; when the block ends normally, rename it to `final`.

    `replace`: an existing `final` is removed only now, once the new folder is complete (`--force`, a stale
    partial download). Without it, if `final` appeared meanwhile (another process won the race), theirs is
    kept. If the block raises, the temporary folder is removed and `final` is untouched.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield staging
        _apply_umask(staging)
        if replace and final.exists():
            shutil.rmtree(final)
        try:
            os.replace(staging, final)
        except OSError:
            if not final.exists():
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextmanager
def staged_files(finals: list[Path]) -> Iterator[Path]:
    """Yield an empty private folder beside the files `finals` (all in one folder); when the block ends
    normally, move each `folder / final.name` that was written to its `final` (replacing it), the first
    of `finals` last, so the main artifact appears only once everything beside it is in place. If the block
    raises, the folder is removed and nothing is published."""
    parent = finals[0].parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{finals[0].name}.", dir=parent))
    try:
        yield staging
        for final in reversed(finals):
            if (staging / final.name).exists():
                os.chmod(staging / final.name, 0o666 & ~_umask())
                os.replace(staging / final.name, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _apply_umask(folder: Path) -> None:
    umask = _umask()
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
