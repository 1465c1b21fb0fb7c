"""Triton interpreter tests (DESIGN.md §3, gate 1): run only in their own process, with the interpreter on:

    TRITON_INTERPRET=1 pytest tests/triton

The variable must be in the environment before ``triton`` is imported, so it cannot be switched on from inside a
``pytest`` run that has already imported triton (the AOT check of the main run compiles real cubins). Without it,
this directory collects nothing.

This file also re-exports the suite's shared helpers (``tests/conftest.py``: one tolerance table, tie-free inputs).
Both files are imported as the module ``conftest`` (no packages under tests/), and pytest replaces
``sys.modules["conftest"]`` with whichever it loaded last; re-exporting everything keeps ``from conftest import``
correct whichever that is.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

if not INTERPRET:
    collect_ignore_glob = ["test_*.py"]

_spec = importlib.util.spec_from_file_location("protofast_tests_conftest", Path(__file__).parents[1] / "conftest.py")
_root = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_root)
globals().update({name: value for name, value in vars(_root).items() if not name.startswith("__")})
