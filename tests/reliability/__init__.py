"""Reliability suite: real processes, real files, real SIGKILLs, a real moto S3 server.

See docs/reliability.md for the guarantees these tests back and the knobs for longer runs.
"""
