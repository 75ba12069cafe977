"""healthd: measures provider health off the request path and drives breaker recovery.

`python -m healthd`; one active process holds a Postgres advisory lock, others stand by.
"""
