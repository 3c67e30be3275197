"""Tiered expert storage: expert weights on a slow tier (checkpoint files on disk), a budgeted
cache of experts in fast memory, background prefetching. See tiered.py."""
