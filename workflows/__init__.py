"""What the tools do, behind their thin command lines in ``tools/``: sweeps and their reports, the
Slurm launcher, throughput profiling, Grad-CAM, run reports, loading and evaluating checkpoints.
Imports ``engine``, ``pipelines``, ``models`` and ``common``; imported only by ``tools/`` and by tests
(README "Layout", docs/design.md "Imports run one way"). Not named like ``tools/`` on purpose: one is
the command line, this is the logic."""
