"""Autoscaling benchmark: KPA, APA and an HPA-like rule on an elastic simulated fleet."""
