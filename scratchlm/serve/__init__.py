"""`scratchlm serve`: an OpenAI-compatible HTTP server with continuous batching, and a web chat page.

app.py holds the routes and the wire format, scheduler.py the batching thread, static/ the page.
Nothing below this floor imports it.
"""
