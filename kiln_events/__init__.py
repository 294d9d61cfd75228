"""Prediction events: the versioned schema endpoints publish and the Kafka producer that sends
them. The inference image installs this package without the rest of kiln."""
