"""sse-sidecar: tee an LLM service's server-sent events into Redis streams for replay."""

__version__ = "0.1.0"
