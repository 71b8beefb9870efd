"""Triton kernels of mbfused, installed as ``mbfused.kernels``; each module imports triton itself."""
