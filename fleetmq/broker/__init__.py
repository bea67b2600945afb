"""The embedded MQTT broker (amqtt): its configuration and plugins stay in this package."""
