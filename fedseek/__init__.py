"""fedseek: privacy-preserving federated learning on Flower + Opacus."""

__version__ = "0.1.0"
