"""``python -m compresskit`` is the ``compresskit`` command."""
from compresskit.cli.main import main

main()
