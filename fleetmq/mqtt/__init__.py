"""The manager's MQTT side: the broker link, ingest of what agents publish, and the publisher
of statuses and replies. The manager's MQTT client library is imported here and nowhere else
(besides the agent package, which speaks as a device does)."""
