"""One module per op family: validation, torch.library registration (fake
kernels, autograd), the documented functional API and the backend choice."""
