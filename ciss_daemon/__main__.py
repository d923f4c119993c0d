"""``python -m ciss_daemon``: the ``ciss`` command, through the same entry point as the installed script."""

from ciss_daemon.entry import main

main()
