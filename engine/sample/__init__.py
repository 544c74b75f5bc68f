"""How a step decides: the sampler (keyed draws), the acceptance rules, the device tail's
decide → commit → propose, the decided row and the host path."""
