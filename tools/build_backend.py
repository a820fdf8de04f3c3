"""shmguard's build backend: setuptools, run from a temporary copy when the source tree is read-only.

setuptools writes shmguard.egg-info/ and build/ into the tree it builds; a read-only checkout (a mount, a
package manager's source directory) would fail with "Read-only file system". Every hook is setuptools' own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from setuptools import build_meta as _setuptools

# What a build never reads: caches, virtual environments, earlier build output.
_NOT_COPIED = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                     ".ruff_cache", ".cache")


def _tree_is_writable() -> bool:
    # os.access sees a read-only mount (EROFS) even for root, whom permission bits never stop.
    return os.access(".", os.W_OK)


@contextlib.contextmanager
def _writable_tree():
    if _tree_is_writable():
        yield
        return
    source = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="shmguard-build-") as tmp:
        copy = Path(tmp) / source.name
        shutil.copytree(source, copy, ignore=_NOT_COPIED, symlinks=True)
        os.chdir(copy)
        try:
            yield
        finally:
            os.chdir(source)


def _absolute(directory: str) -> str:
    return os.path.abspath(directory)


def get_requires_for_build_wheel(config_settings=None):
    with _writable_tree():
        return _setuptools.get_requires_for_build_wheel(config_settings)


def get_requires_for_build_sdist(config_settings=None):
    with _writable_tree():
        return _setuptools.get_requires_for_build_sdist(config_settings)


def get_requires_for_build_editable(config_settings=None):
    return _setuptools.get_requires_for_build_editable(config_settings)


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    directory = _absolute(metadata_directory)
    with _writable_tree():
        return _setuptools.prepare_metadata_for_build_wheel(directory, config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    directory = _absolute(wheel_directory)
    metadata = _absolute(metadata_directory) if metadata_directory else None
    with _writable_tree():
        return _setuptools.build_wheel(directory, config_settings, metadata)


def build_sdist(sdist_directory, config_settings=None):
    directory = _absolute(sdist_directory)
    with _writable_tree():
        return _setuptools.build_sdist(directory, config_settings)


# An editable install points into the tree itself, so it is built there (it needs a writable checkout).
prepare_metadata_for_build_editable = _setuptools.prepare_metadata_for_build_editable
build_editable = _setuptools.build_editable
