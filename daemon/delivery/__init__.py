"""Getting word out: the alert outbox (at-least-once, persisted) and heartbeat pings."""
