"""Training loops (VAE, DiT). Nothing outside the CLI imports this package."""
