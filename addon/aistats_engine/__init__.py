"""aistats engine: plain Python, no mitmproxy import."""
