// The reggan_ext operator namespace. Each op's folder adds its schema with TORCH_LIBRARY_FRAGMENT.
#include <torch/library.h>

TORCH_LIBRARY(reggan_ext, m) {}
