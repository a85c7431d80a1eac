"""Building blocks no library ships (gradient reversal, sinusoidal condition codes, FiLM)."""
