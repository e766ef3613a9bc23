"""unet-cuda: the U-Net of Ronneberger, Fischer and Brox (2015) with hand-written CUDA kernels.

The pieces, from the bottom up:

* ``unet_cuda.ops`` — every operation of the network, forward and backward, as flat functions:
  the NumPy reference (``ops.reference``, the specification and CPU backend) and our CUDA kernels
  (``ops.cuda`` over ``unet_cuda._C``), dispatched by array type. docs/OPS.md is the contract.
* ``unet_cuda.autograd`` / ``unet_cuda.functional`` — a small tape that wires the ops together.
* ``unet_cuda.UNet``, ``unet_cuda.SGD`` — the paper's network and optimiser.
* data, weight maps, augmentation, tiling, metrics, and the command lines
  ``python -m unet_cuda.train`` and ``python -m unet_cuda.predict``.
"""

from .autograd import Tensor, no_grad
from .model import UNet
from .optim import SGD
from .ops import cuda_available
from .sizes import IllegalSizeError, legal_input_sizes, output_size

__version__ = "0.1.0"

__all__ = ["Tensor", "no_grad", "UNet", "SGD", "cuda_available", "IllegalSizeError",
           "legal_input_sizes", "output_size", "__version__"]
