"""Framework-neutral building blocks: parameters, results, randomness, errors."""
