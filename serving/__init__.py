"""Serving side of earlyexit: the bundle format, the onnxruntime chain runtime and the HTTP server.

Never imports torch or `training`. Submodules load lazily; importing `serving` is cheap.
"""
