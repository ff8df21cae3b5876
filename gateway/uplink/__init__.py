"""The MQTT uplink: store-and-forward from the journal to the head-end, and durable
intake of commands (acknowledged to the broker only once they are in the ledger)."""
