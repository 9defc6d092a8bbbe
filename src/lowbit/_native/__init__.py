"""C++ sources of lowbit's XNOR + popcount kernels; ``lowbit.runtime`` loads the built ``_kernels`` module."""
