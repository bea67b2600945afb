"""CLI commands besides ``serve``; see ``fleetmq.cli.COMMAND_MODULES``."""
