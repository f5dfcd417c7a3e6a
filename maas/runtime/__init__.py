"""Running models inside maas."""
