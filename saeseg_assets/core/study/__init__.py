"""The suppression study: latent statistics and rules, codes, the edit, logit shift, windows, the study."""
