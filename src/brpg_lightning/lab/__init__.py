"""The diagnostics lab: instruments for studying a run, kept apart from the product.

Nothing in the product imports this package. Each piece attaches through the seams a user's own extension
would use: a method subclass (:class:`~brpg_lightning.lab.oracle.OracleMeanTeacher`) or a Lightning callback
(:class:`~brpg_lightning.lab.quality.PseudoLabelQuality`, :class:`~brpg_lightning.lab.quality.StudentValidation`),
composed by the configs in ``conf/experiment/diagnose/`` and run by ``benchmarks/diagnose_semi.py``.
The hidden true masks of the synthetic unlabeled images that they read are written only when a diagnostic
asks for them (``dataset.oracle_mask_dir``).
"""
