"""Sensor drivers: each is an async source of stamped samples (see `drivers.base.Driver`)."""
