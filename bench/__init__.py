"""Benchmarks (not tests): see bench/relay.py."""
