"""Functional ops: one module per op family."""
