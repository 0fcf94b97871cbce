"""The `compressor` command: `compress` runs a job locally; `submit`, `jobs`, `status`,
`cancel`, `download` talk to a running service.

Other packages add commands through the `compressor.commands` entry-point group: the service
(`api`) declares `serve` and `worker` there (see pyproject.toml), so the core never imports the
service, and `import compressor.cli` loads none of it until such a command is asked for.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

import click

from compressor.cli import client_commands, compress_command

COMMAND_GROUP = "compressor.commands"


class _CommandsWithPlugins(click.Group):
    """The core's commands, plus those declared in the entry-point group (loaded when asked)."""

    def _declared(self) -> dict[str, EntryPoint]:
        return {entry.name: entry for entry in entry_points(group=COMMAND_GROUP)}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._declared()})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        entry = self._declared().get(cmd_name) if command is None else None
        return entry.load() if entry is not None else command


@click.group(cls=_CommandsWithPlugins, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="compressor")
def main() -> None:
    """Compress PyTorch programs into low-rank or tied form and export verified ONNX."""


for _module in (compress_command, client_commands):
    for _command in _module.COMMANDS:
        main.add_command(_command)
