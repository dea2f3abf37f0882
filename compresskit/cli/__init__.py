"""The compresskit command line (Typer)."""
