"""``python -m unet_cuda`` points to the two command lines."""

print("unet-cuda: use `python -m unet_cuda.train --help` or `python -m unet_cuda.predict --help`.")
