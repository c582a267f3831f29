"""KServe v2 / Triton.

The HTTP routes, and the tensor codec and sequence mapping that every v2 transport shares.
"""
