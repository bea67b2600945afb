"""The REST facade over aiohttp: the app and its routes, and the OpenAPI document."""
