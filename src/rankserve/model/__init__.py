"""The model: checkpoint format, configuration and the PyTorch architecture."""
