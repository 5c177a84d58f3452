"""Delivery channel connectors, found by name in ``connectors.delivery.registry``."""
