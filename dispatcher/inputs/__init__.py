"""Records coming in: the readers (JSONL, CSV, id lists, stdin) in batches, the stable record
keys, and the path and body rules. A bad line becomes an ``Invalid``, never a crash.
Knows nothing of HTTP, rates or where results go.
"""
