"""Make the PyPI torchvision wheel importable next to a CPU-only torch build.

The torchvision wheel on PyPI is a CUDA build. With the CPU torch its compiled ops (``_C.so``) fail
to load, and ``torchvision/_meta_registrations.py`` then dies on import with
``RuntimeError: operator torchvision::nms does not exist`` -- which breaks importing transformers,
diffusers, timm and open_clip, since they all import torchvision.

``env_setup.sh`` copies this file into the virtual environment's site-packages and adds a ``.pth``
line that imports it at interpreter start-up (so pytest, torchrun workers and CLIs are covered).
It costs nothing until ``torchvision`` is first imported: a meta-path hook then tries to load the
real compiled ops, and only if that fails declares the two operator schemas torchvision's fake
kernels expect. ``torchvision.transforms`` then works; ``torchvision.ops`` (unused here) does not.
This module must stay self-contained: it runs before any project code is importable.
"""

import glob
import importlib.abc
import importlib.util
import os
import sys

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # keeps the torch.library fragment alive for the life of the process


def ensure_torchvision_ops() -> bool:
    """Load torchvision's compiled ops, or declare stand-in schemas. Returns True if the real ops loaded."""
    global _library
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False
    for path in glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so")):
        try:
            torch.ops.load_library(path)
            return True
        except (OSError, ImportError, RuntimeError):
            pass
    if _library is None:
        _library = torch.library.Library("torchvision", "FRAGMENT")
        for schema in _SCHEMAS:
            _library.define(schema)
    return False


class _TorchvisionImportHook(importlib.abc.MetaPathFinder):
    """Runs `ensure_torchvision_ops` once, just before the first ``import torchvision``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)
        try:
            ensure_torchvision_ops()
        except Exception as exc:  # never block the import itself; torchvision will say what broke
            print(f"g2rpo torchvision compat hook failed: {exc!r}", file=sys.stderr)
        return None  # let the regular finders import torchvision


def install() -> None:
    if "torchvision" in sys.modules or any(isinstance(f, _TorchvisionImportHook) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _TorchvisionImportHook())
