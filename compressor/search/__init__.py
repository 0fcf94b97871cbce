"""Searches that drive the stages instead of living in them: target mode (`target`)."""
