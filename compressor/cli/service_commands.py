"""Commands of the `compressor` CLI (filled in by its owner)."""

COMMANDS: list = []
