"""Drop-in replacements for routing layers of other libraries.

* :mod:`mind_kernels.compat.torch_rechub` - torch-rechub's ``CapsuleNetwork`` (MIND / ComirecDR),
  with ``patch()`` / ``unpatch()`` to swap it inside an installed torch-rechub.

The submodules import their foreign library lazily, so importing this package
never requires torch-rechub.
"""
