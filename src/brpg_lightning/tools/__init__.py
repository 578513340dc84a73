"""Command-line tools: ``python -m brpg_lightning.tools.<name>``."""
