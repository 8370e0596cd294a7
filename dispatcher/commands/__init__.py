"""The command line on top of everything: the entry point, ``send``, ``load``, ``report``,
``demo``, ``--dry-run`` and the progress display. Turns errors into one line and an exit
code; holds no business rules of its own.
"""
