"""gRPC over HTTP/2 on asyncio, sized for ext_proc's many short streams."""
