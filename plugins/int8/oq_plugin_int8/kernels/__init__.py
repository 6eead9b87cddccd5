"""Triton kernels of oq-plugin-int8. Importing a module here imports triton: the backends load them
lazily, inside the functions that run them, so ``oq_plugin_int8.plugin`` stays cheap to import."""
