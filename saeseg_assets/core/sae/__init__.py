"""The sparse autoencoder: model and kernels, training, evaluation, import and export."""
