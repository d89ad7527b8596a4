"""bench: compare pretrained image backbones for transfer learning."""

__version__ = "0.1.0"
