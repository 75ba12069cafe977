"""Code shared by the web process (`service`) and the health daemon (`healthd`).

Wire types, the error table, provider adapters, the breaker and the state bus live here so
that neither process imports the other.
"""
