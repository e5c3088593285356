"""Engines: compiled models with declared tensor inputs and outputs, and their preprocessing.

The node imports `engines.base`, `engines.preprocess`, `engines.spec` and `engines.backends`,
which imports the one backend module a launch file asks for (`onnxruntime_backend`,
`tensorrt_backend`, `torch_backend`); each imports its runtime inside its own module.
`training.models` and `training.export` need torch and are only for building and training models.
"""
