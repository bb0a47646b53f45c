"""Benchmarks of sse-sidecar against its peers (see bench/README-section.md, `make bench`).

Standard library only at import: the Letta peer imports ``bench.common`` from its own
virtualenv.
"""
