"""smat-dist: distributed meta-training of SMAT (Sparse MeTa-Tuning) on Ray Train + DeepSpeed."""

__version__ = "0.1.0"
