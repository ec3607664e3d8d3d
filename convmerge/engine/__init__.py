"""Tensor work and the plan: kernels composed and checked, the float64 reference, the plan."""
