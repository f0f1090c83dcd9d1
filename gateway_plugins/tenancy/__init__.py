"""Tenants: who is calling (users, API keys), what they may use (limits) and what they used (usage)."""
