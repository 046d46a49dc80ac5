"""Hand-written compute kernels and their reference specifications."""
