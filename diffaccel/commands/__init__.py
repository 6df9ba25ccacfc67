"""CLI subcommands, one module each (see diffaccel.cli.COMMANDS)."""
