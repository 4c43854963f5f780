"""Tasks beyond the default classification: model, training, scoring and the loss for Hessian traces."""
