"""The fault-injection suite: real svdbench processes killed, interrupted, starved of disk, raced and fed
corrupted files (see harness.py)."""
