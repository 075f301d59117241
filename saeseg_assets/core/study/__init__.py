"""The suppression study: latent statistics and rules, codes, the shared model, the edit and its controls, exact logit
shifts, the measures, the per-class study and its examples."""
