"""The front-ends: one package per protocol, the uvicorn extensions in their own.

- ``v1/``: gruserve's own REST, NDJSON stream, WebSocket and bulk routes.
- ``v2/``: the KServe v2 / Triton protocol: HTTP routes, and the tensor codec and
  sequence mapping every v2 transport shares.
- ``protocols/``: what extends uvicorn's HTTP and WebSocket protocols and the edge
  every request passes (limits, request ids, disconnects).

Beside them, what every front-end shares: ``app`` (the factory), ``errors`` (exception
to status), ``_auth``, ``decode``/``encode``, ``health``, ``docs``. Routers parse and
delegate; none of them holds GRU math.
"""
