"""Only what pyproject.toml cannot say: every shmguard subpackage, plus policies/ and guest/ installed inside it."""

from setuptools import find_packages, setup

# pyproject.toml's [tool.setuptools.package-dir] maps these two top-level directories into the package.
MAPPED = ["shmguard.policies", "shmguard.guest_sources"]

setup(packages=find_packages(include=["shmguard", "shmguard.*"]) + MAPPED)
