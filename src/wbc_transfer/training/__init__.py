"""Training: the one build/fit (trainer), the optimiser/schedule recipe, the CPU thread policy and
the few-label adaptation to a new lab."""
