"""The SAE package: hooked policy, activation dumps, TopK sparse autoencoders; shared by clt."""
