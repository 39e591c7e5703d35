"""g2rpo: Granular GRPO (G²RPO) for FLUX -- faithful, fast, resumable."""

__version__ = "0.1.0"
