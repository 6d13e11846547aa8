"""Cross-layer transcoders for the TSP policy; mirrors and reuses the sae package."""
