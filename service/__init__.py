"""The web process: `python -m service`."""
