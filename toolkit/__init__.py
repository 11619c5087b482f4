"""Tool logic: sweeps, sweep reports, throughput profiling, Grad-CAM, loading checkpoints for tools and
checkpoint evaluation. Imports ``engine``, ``pipelines``, ``models`` and ``common``; imported only by the
``tools/`` command-line front ends and by tests (README "Layout", docs/design.md "Imports run one way")."""
