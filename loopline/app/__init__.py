"""The application layer: the ``loopline`` command line, ``up``/``down``, the demo, status and
tools.

It sits above the services (it mounts their command groups and starts them as processes), which
sit above the shared core in :mod:`loopline`; the core never imports from here.
"""
