"""HTTP routes of the web process, one module per area."""
