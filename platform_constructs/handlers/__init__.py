"""Lambda handlers of kiln's deploy-time custom resources (packaged as Lambda code assets)."""
