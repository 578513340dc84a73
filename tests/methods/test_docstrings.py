"""Every public module and class of ``brpg_lightning.methods`` documents itself."""

import importlib
import inspect
import pkgutil

import brpg_lightning.methods as methods
from brpg_lightning.methods.base import SegmentationModule


def _modules():
    yield methods
    for info in pkgutil.iter_modules(methods.__path__):
        if not info.name.startswith("_"):
            yield importlib.import_module(f"{methods.__name__}.{info.name}")


def test_segmentation_module_docstring_is_the_class_docstring():
    assert SegmentationModule.__doc__ and SegmentationModule.__doc__.startswith("Base LightningModule")


def test_public_modules_and_classes_have_docstrings():
    missing = []
    for module in _modules():
        if not (module.__doc__ or "").strip():
            missing.append(module.__name__)
        for name, obj in vars(module).items():
            if name.startswith("_") or not inspect.isclass(obj) or obj.__module__ != module.__name__:
                continue
            # the class's own docstring, not one inherited from a base class
            if not (obj.__dict__.get("__doc__") or "").strip():
                missing.append(f"{module.__name__}.{name}")
    assert not missing, f"no docstring: {missing}"
