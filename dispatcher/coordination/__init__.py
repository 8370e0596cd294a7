"""Coordination on Redis: one account budget (a GCRA reservation script, a shared pause)
and one job's work (shards of the input in a Stream, one final envelope per record key)
shared by every process and host. Knows nothing of records' content or HTTP.
"""
