"""Records going out: the engine (source -> worker pool -> results stream), the run-wide rate
gate and pacer, the retry policy (pure) and the run's counters. It drives a client through
the transport protocol and knows nothing of input formats, URLs or how results are stored.
"""
