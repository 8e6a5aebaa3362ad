"""egressd: an egress firewall and tunnel detector for GPU training nodes."""

__version__ = "0.1.0"
