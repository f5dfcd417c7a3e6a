"""Who is calling and what they may do: tenants, API keys, roles, per-key limits."""
