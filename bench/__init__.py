"""Benchmarks of the serving path (``make bench``); figures go to bench/README.md."""
