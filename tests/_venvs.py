"""Virtual environments the install tests build once and reuse, so a rerun of ``make test`` takes seconds.

They live outside the repository, under ``~/.cache/detox-test-venvs`` (``$DETOX_TEST_VENVS``), one directory per
name and key (a hash of what the environment depends on: ``pyproject.toml``, a version spec); directories of the
same name unused for two days are removed when a new key is built (``rm -rf ~/.cache/detox-test-venvs`` frees all).
A build holds a lock, and an environment counts as built only once its stamp is written, so an interrupted build is
started over, never used.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("DETOX_TEST_VENVS") or Path.home() / ".cache" / "detox-test-venvs")
STAMP = ".detox-test-venv-complete"


def digest(*parts: str | bytes | Path) -> str:
    """A short hash of strings and of files' contents (a directory: every file under it, in sorted order)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            files = sorted(p for p in part.rglob("*") if p.is_file() and "__pycache__" not in p.parts) if part.is_dir() else [part]
            for f in files:
                h.update(str(f.relative_to(part) if part.is_dir() else f.name).encode())
                h.update(f.read_bytes())
        else:
            h.update(part if isinstance(part, bytes) else part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def run(cmd: Sequence[str | Path], timeout: float = 1800, **kwargs) -> subprocess.CompletedProcess:
    """Run a command; on failure raise with its output (a failed install must say why)."""
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def python_of(venv: Path) -> Path:
    return venv / "bin" / "python"


def cached_venv(name: str, key: str, build: Callable[[Path], None],
                refresh: Callable[[Path], None] | None = None) -> Path:
    """``CACHE/name-key``, made by ``build(path)`` (after ``python -m venv path``) unless a complete one exists;
    ``refresh(path)`` then runs on every call, under the same lock (e.g. to reinstall detox after a code change)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    venv = CACHE / f"{name}-{key}"
    with open(CACHE / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; a second run waits, then reuses it
        if not (venv / STAMP).is_file():
            _remove_unused(name)
            shutil.rmtree(venv, ignore_errors=True)  # an interrupted build
            run([sys.executable, "-m", "venv", venv])
            build(venv)
            (venv / STAMP).write_text(key)
        (venv / STAMP).touch()  # last use, for _remove_unused
        if refresh is not None:
            refresh(venv)
    return venv


def _remove_unused(name: str, days: float = 2.0) -> None:
    """Remove environments of this name unused for ``days`` (other checkouts may still use recent ones)."""
    import time

    for old in CACHE.glob(f"{name}-*"):
        stamp = old / STAMP
        if old.is_dir() and stamp.is_file() and time.time() - stamp.stat().st_mtime > days * 86400:
            shutil.rmtree(old, ignore_errors=True)


def layer_on_current_env(venv: Path) -> None:
    """Make ``venv`` see every package of the environment running the tests, after its own (a ``.pth`` that calls
    ``site.addsitedir``, so the base's own ``.pth`` files, editable installs included, are processed too).

    Packages installed into ``venv`` then shadow the base's: a few MB instead of a second torch.
    """
    base = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    own = run([python_of(venv), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    lines = "".join(f"import site; site.addsitedir({p!r})\n" for p in sorted(base))
    (Path(own) / "zz_detox_test_base.pth").write_text(lines)
