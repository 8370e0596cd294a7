"""Where every record ends: the envelope builder (the truth rule), the JSONL and SQLite
stores, the ledger that resume reads and the crash journal. Knows nothing of HTTP,
rates or input formats.
"""
