"""Database schema: numbered SQL migrations (`migrations/`) and the code that applies them
(`schema.migrate`, also `python -m schema migrate`)."""
