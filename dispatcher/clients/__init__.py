"""The transport protocol and the clients that implement it (the lean HTTP/1.1 client and the
aiohttp one): URLs, auth headers, keep-alive, and one rule that maps an answer to an
``Outcome``. Knows nothing of retries, rates, records' files or results.
"""
