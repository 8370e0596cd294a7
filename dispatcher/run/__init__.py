"""Wiring one run: settings and config (flags > env > TOML > defaults), the runner that joins
inputs, gate, client, engine and results, signals, ``--processes`` and the load-test
engine. Knows nothing of terminals, argument parsing for subcommands or output formats.
"""
