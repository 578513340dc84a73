"""brpg-lightning: Boundary-Refined Prototype Generation for semi-supervised semantic segmentation.

Paper: "Boundary-Refined Prototype Generation: A General End-to-End Paradigm for Semi-Supervised
Semantic Segmentation". See ``docs/architecture.md`` for where each equation lives.
"""

from brpg_lightning import quiet as _quiet

__version__ = "0.1.0"

_quiet.install()  # before any Trainer exists: every entry point and the tests import the package first
