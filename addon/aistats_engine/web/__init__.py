"""The web endpoint: Prometheus scrapes, the JSON API, live events (SSE) and the activity UI.

``server.WebServer`` serves them from a thread and an asyncio loop of its own (tornado);
``events.EventHub`` is the bus output that feeds the live events; ``params`` checks the API's
query parameters. Nothing here imports mitmproxy. Import them from their modules: the server
(tornado) is only imported when something is served.
"""
