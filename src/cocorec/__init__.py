"""cocorec: CTR prediction with personalised knowledge from a language model."""
__version__ = "0.1.0"
