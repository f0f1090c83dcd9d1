"""Where engine pods come from: a static endpoints file or the Kubernetes API, into one registry."""
