"""Durable state files of the artifacts root, each a locked, atomic read-modify-write: training lines and their
drops (lines.py), promotions per lineage (promotions.py)."""
