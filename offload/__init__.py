"""The runtime: model code per family, checkpoint loading, offloaded execution, generation."""
