"""The model layer: loading models offline, finding what to compress, the
compressed layer types, and saving and loading compressed models."""
