"""``python -m loopline.app``: the ``loopline`` command line."""

from loopline.app.cli import main

main()
