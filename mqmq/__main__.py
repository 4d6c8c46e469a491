"""``python -m mqmq``: the same as the ``mqmq`` command."""

from mqmq.cli import main

main()
