"""Integrations with other libraries (optional extras).

* :mod:`mmkernels.integrations.transformers` (extra ``[hf]``): the ``"mmkernels"``
  attention implementation for Hugging Face transformers, ``apply_to_clip``,
  ``apply_to_llava`` and ``revert``. Importing it registers the attention; it needs
  transformers installed. This package itself imports nothing optional.
"""
