"""The Brickyard gateway: an Envoy ext_proc server that routes OpenAI requests to engine pods."""
