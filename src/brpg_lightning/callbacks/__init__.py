"""Operational Lightning callbacks: exact resume, pre-emption, progress, W&B media.

The algorithm's callback (BRPG) lives in :mod:`brpg_lightning.brpg.callback`; these only run the run.
"""
