"""Scaling algorithms of the PodAutoscaler (KPA, APA, an HPA-like baseline) as pure functions."""
