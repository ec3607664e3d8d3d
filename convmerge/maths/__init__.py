"""Pure maths, no tensors: conv specs, the pair rules, joins of branches, reasons, regions."""
