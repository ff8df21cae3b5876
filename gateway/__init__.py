"""meter-gateway: the service on an electricity meter concentrator."""

__version__ = "0.1.0"
