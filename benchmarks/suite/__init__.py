"""The parts of benchmarks/run.py: servers, peers, one module per measurement, the report."""
