"""The one consume loop every service runs: batches, delivery (at-least-once or transactions),
outputs and dead letters, state in Kafka and the units it is owned by."""
