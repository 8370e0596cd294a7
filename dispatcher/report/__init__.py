"""Reading results files back: summaries (outcomes, HDR latency percentiles, throughput) and
plots. Stands beside the flow: knows nothing of HTTP, rates or how records were sent.
"""
