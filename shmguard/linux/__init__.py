"""The code that talks to the kernel directly, with no knowledge of the rest of shmguard."""
