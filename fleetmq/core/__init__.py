"""The pure core: wire models, topics, the clock, the registry and its events.

Stdlib and pydantic only (a test keeps it so): no MQTT, HTTP, files or stores in here.
"""
