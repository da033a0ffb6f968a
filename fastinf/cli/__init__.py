"""The ``fastinf`` command line: ``app`` builds the parser from one module per command (``extract``,
``score``, ``aggregate``, ``ndr``, ``index``, ``search``, ``train``, ``run``, ``plan``, ``layers``, ``store``,
``demo``); each module registers its arguments and calls one library function. Read ``app.py`` first.
"""
from fastinf.cli.app import build_parser, main  # noqa: F401
