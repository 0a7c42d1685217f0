"""Integrations with the training stacks people use (imported on demand, never by ``import twa_kernels``):

* :mod:`twa_kernels.integrations.huggingface`: the Hugging Face ``Trainer`` (``pip install "twa_kernels[hf]"``);
* :mod:`twa_kernels.integrations.lightning`: a Lightning callback (``pip install "twa_kernels[lightning]"``).
"""
