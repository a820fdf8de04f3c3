"""The built-in policies, installed as the package shmguard.policies (the directory of this file: shmguard.policy.BUILTIN_DIR)."""
