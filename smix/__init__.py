"""Shared foundation of the toolkit: architectures, the checkpoint format, data readers,
run folders and distributed set-up. Every stage imports from here and from nowhere else."""

__version__ = "0.1.0"
