"""The `compressor` command: `compress` runs a job locally; `serve` / `worker` run the service;
`submit`, `jobs`, `status`, `cancel` talk to a running service."""

from __future__ import annotations

import click

from compressor.cli import client_commands, compress_command, service_commands


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="compressor")
def main() -> None:
    """Compress PyTorch programs into low-rank or tied form and export verified ONNX."""


for _module in (compress_command, service_commands, client_commands):
    for _command in _module.COMMANDS:
        main.add_command(_command)
