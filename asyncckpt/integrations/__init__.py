"""Thin adapters for training frameworks; each imports its framework only when used.

- :mod:`asyncckpt.integrations.lightning`: a PyTorch Lightning ``Callback``.
- :mod:`asyncckpt.integrations.transformers`: a Hugging Face ``TrainerCallback``.
"""
