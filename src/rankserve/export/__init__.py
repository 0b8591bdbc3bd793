"""Exports of the one PyTorch model definition (`rankserve.model.llama`) to other runtimes' formats."""
