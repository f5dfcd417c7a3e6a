"""Request loops. Knows requests, not HTTP or SQL."""
