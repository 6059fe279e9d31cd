"""Searches over amplification factors and merge settings (strategies behind STRATEGIES in dppa.search.registry)."""
