"""Shared test configuration. Helpers live in the `tests.support` package."""
