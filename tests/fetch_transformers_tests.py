"""Fetch transformers' own common model tests (`tests/` of the installed version's source distribution).

    python tests/fetch_transformers_tests.py

Downloads the sdist of the installed transformers with pip (`pip download --no-deps --no-binary :all:`) and
extracts only its `tests/` folder into `.cache/transformers-tests/<version>/`, or into the folder that
`MLMAMBA_TRANSFORMERS_TESTS` names. Does nothing when that folder is already there. Always exits 0 and prints
one line: without network the download fails, and `tests/test_transformers_common.py` then skips with the reason.
"""

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ENV = "MLMAMBA_TRANSFORMERS_TESTS"
MARKER = Path("tests") / "test_modeling_common.py"


def tests_folder(version: str | None = None) -> Path:
    """The folder that holds (or will hold) `tests/` of transformers `version` (default: the installed one)."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser().resolve()
    version = version or importlib.metadata.version("transformers")
    return Path(__file__).resolve().parent.parent / ".cache" / "transformers-tests" / version


def _extract_tests(archive: Path, destination: Path) -> int:
    """Extract `<top>/tests/...` of the sdist into `destination/tests/...`; returns the number of files."""
    count = 0
    with tarfile.open(archive) as tar:
        members = []
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if len(parts) < 3 or parts[1] != "tests" or not (member.isfile() or member.isdir()):
                continue
            member.name = str(Path(*parts[1:]))
            members.append(member)
            count += member.isfile()
        # The "data" filter (no absolute paths, links out or device files) where this Python has it.
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(destination, members=members, **safe)
    return count


def fetch() -> str:
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return f"transformers is not installed for {sys.executable}: nothing to fetch"
    destination = tests_folder(version)
    if (destination / MARKER).is_file():
        return f"transformers {version} tests already in {destination}"
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet"]
        command += ["--dest", tmp, f"transformers=={version}"]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"could not download transformers {version}'s source distribution: {error}"
        archives = sorted(Path(tmp).glob("transformers-*.tar.gz"))
        if result.returncode != 0 or not archives:
            why = (result.stderr or result.stdout).strip().splitlines()
            return f"could not download transformers {version}'s source distribution: {why[-1] if why else '?'}"
        staging = Path(tmp) / "staging"
        n_files = _extract_tests(archives[0], staging)
        if not (staging / MARKER).is_file():
            return f"transformers {version}'s source distribution has no {MARKER}"
        destination.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(destination / "tests", ignore_errors=True)
        shutil.move(staging / "tests", destination / "tests")
    return f"extracted {n_files} files of transformers {version}'s tests/ into {destination}"


if __name__ == "__main__":
    print(f"fetch_transformers_tests: {fetch()}")
