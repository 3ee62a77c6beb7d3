"""Benchmarks: ``python -m mmkernels.bench`` is the main job (see __main__)."""
