"""Hyper-parameter sweeps over a recipe, in the order a sweep happens: :mod:`.plan` (the sweep
file, its trials, the data subset), :mod:`.run` (one trial, and the local and Slurm executors) and
:mod:`.report` (results.csv, the tables and the plot, from what the trials wrote). The CLI is
tools/sweep.py."""
