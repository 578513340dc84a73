"""Speed and memory benchmarks of brpg-lightning (``make bench`` / ``python -m benchmarks``).

Each ``bench_*.py`` module exposes ``run(quick: bool) -> list[str]``; ours and the reference run side
by side in one process, repeated, and the medians and their ratios are printed with the target.
"""
