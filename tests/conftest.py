"""Shared test configuration; `tests/` is on sys.path (pyproject) so `tiny_models` imports."""
