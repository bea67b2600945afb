"""CLI commands besides ``serve``; see ``fleetmq.cli.COMMAND_MODULES``."""

from __future__ import annotations


def table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """Columns padded to their widest cell, two spaces apart, the header first."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    lines = ("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
             .rstrip() for row in (headers, *rows))
    return "\n".join(lines) + "\n"
