"""gruserve's own protocol (``/v1``).

REST sessions and models, NDJSON streams, WebSocket, bulk steps.
"""
