"""The Envoy External Processing protocol: stream state machine, reply encoding, wire contracts."""
