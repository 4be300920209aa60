"""RegGAN application package (placeholder for the metrics branch; the app branch owns the real
one)."""
