"""Monitor: data quality, feature and prediction drift, performance from feedback, zombie models."""
