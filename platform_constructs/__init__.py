"""Reusable L3 constructs that kiln's stacks are built from."""
