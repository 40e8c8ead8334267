"""MatrixWorld's world model: frame VAE, video DiT with the interactive module, Swin-DPM sampler.

Importing this package imports nothing heavy; submodules are imported where used.
"""

__version__ = "0.1.0"
