"""Engines: compiled models with declared tensor inputs and outputs, and their preprocessing.

The node imports `engines.base`, `engines.preprocess` and one backend module
(`engines.onnxruntime_backend`); backends import their runtime lazily inside their own module.
`engines.models` and `engines.export` need torch and are only for building and training models.
"""
