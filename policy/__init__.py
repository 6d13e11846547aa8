"""The TSP substrate: instances, the Attention Model, training, solving and evaluation."""

__version__ = "0.1.0"
