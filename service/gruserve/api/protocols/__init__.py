"""uvicorn protocol extensions and the HTTP edge.

One write per response, the step without ASGI, frame and header limits, disconnects.
"""
