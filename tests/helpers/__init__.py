"""Helpers shared by the tests and the benchmarks (and nothing else they share): data sets, runs of the
engine and the tools, fault and cluster cases. No test module imports another; both import these."""
