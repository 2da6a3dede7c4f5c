"""Stands in for ``pynvml`` inside a ``tuner`` subprocess: put this folder first on ``PYTHONPATH`` and the
fake's JSON spec in ``FAKE_NVML_SPEC`` (``tests.fakes.fake_pynvml.from_spec``).  The probe's lazy
``import pynvml`` then gets the fake, built over the *real* binding's classes and structs, which are
loaded from the next ``pynvml`` on ``sys.path``."""

import importlib.machinery
import importlib.util
import json
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.machinery.PathFinder.find_spec(
    "pynvml", [p for p in sys.path if os.path.abspath(p or ".") != _here]
)
if _spec is None or _spec.loader is None:
    raise ImportError("the real nvidia-ml-py (pynvml) is not installed")
_real = importlib.util.module_from_spec(_spec)
sys.modules["pynvml"] = _real  # before it runs: the binding sets its error classes on sys.modules[__name__]
_spec.loader.exec_module(_real)  # and tests.fakes.fake_pynvml imports it as the real binding

from tests.fakes.fake_pynvml import from_spec  # noqa: E402

sys.modules["pynvml"] = from_spec(json.loads(os.environ.get("FAKE_NVML_SPEC") or "{}"))
