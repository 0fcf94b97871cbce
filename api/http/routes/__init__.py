"""One router per resource: `jobs` (with its artifacts and events) and `health`."""
