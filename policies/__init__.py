"""The built-in policies, installed as the package shmguard.policies (read with importlib.resources)."""
