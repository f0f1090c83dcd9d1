"""Slim Kubernetes controllers: ModelAdapter placement, PodAutoscaler, model routes."""
