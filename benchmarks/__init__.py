"""`earlyexit-bench` and what it measures with: in-process benchmarks of a bundle, HTTP load
tests against a running server, the early-exit vs full-model HTTP comparison, and their plots.

Never imported by the server at run time, and not shipped in the serving image
(docker/Dockerfile copies `core`, `serving` and `thresholds` only).
"""
