"""Billing and prepaid cost control: tariffs (tariff.py), the pure pricing of meter
registers into money (pricing.py), and the cost-control thread that bills the journal into
the account store, warns, and asks for cut-offs and restores (costcontrol.py)."""
