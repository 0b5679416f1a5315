"""Triton backend of the routing op (see routing.py)."""
