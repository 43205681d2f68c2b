"""Console entry point of ``sparsegrad``: parses the arguments *before* ``peft_sparsegrad`` is imported.

``import peft_sparsegrad`` registers SparseGrad with PEFT, which imports peft, transformers and torch (~5 s). The
argument parser in ``peft_sparsegrad/cli.py`` needs only the standard library, so it is loaded here straight from its
file (without running the package's ``__init__``): ``sparsegrad --help`` and argument errors answer at once, and only
a command that actually runs imports the package.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Optional, Sequence


def _parser_module():
    spec = importlib.util.find_spec("peft_sparsegrad")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "cli.py")
    cli_spec = importlib.util.spec_from_file_location("_sparsegrad_cli_parser", path)
    if cli_spec is None or cli_spec.loader is None:
        return None
    module = importlib.util.module_from_spec(cli_spec)
    cli_spec.loader.exec_module(module)
    return module


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser_module = _parser_module()
    if parser_module is not None:
        try:
            parser_module.build_parser().parse_args(argv)
        except SystemExit as exc:  # --help (0) or an argument error (2, already printed as one line)
            return exc.code if isinstance(exc.code, int) else 2
    from peft_sparsegrad.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
