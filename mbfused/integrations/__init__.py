"""Framework integrations: one module per framework, each imported on its own.

- :mod:`mbfused.integrations.transformers`: Hugging Face ``Trainer``.
- :mod:`mbfused.integrations.accelerate`: Hugging Face Accelerate.
- :mod:`mbfused.integrations.lightning`: PyTorch Lightning.

Importing :mod:`mbfused` never imports a framework; importing one of these modules imports
that framework (install them with ``pip install mbfused[integrations]``).
"""
