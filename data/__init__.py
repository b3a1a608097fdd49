"""Lotka-Volterra data and the LLMTIME text pipeline (numpy + h5py only; see docs/data.md)."""
