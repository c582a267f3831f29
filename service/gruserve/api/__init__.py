"""HTTP and WebSocket edge: routers parse and delegate; ``errors`` maps exceptions to statuses."""
