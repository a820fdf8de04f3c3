"""The built-in guest's sources (agent.c, init), installed as the package shmguard.guest_sources."""
