"""quantkit: recipe-driven quantization and model compilation."""
__version__ = "0.1.0"
