"""Benchmarks: samples (``datasets``), scores (``metrics``), the runner (``runner``: ``run_benchmark``) and
the results folder with its report (``report``); the ``ctxopt bench`` command lives in ``cli``."""
