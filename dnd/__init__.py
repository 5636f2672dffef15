"""dnd: Describe-and-Dissect, plain-language descriptions of the units of vision networks."""

__version__ = "0.1.0"
