"""Routing: request and pod types, strategies (pure scoring functions), selection, the router."""
