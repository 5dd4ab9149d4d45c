"""Independent PyTorch and tf.keras builds of the networks: the references of the parity tests and the benchmark."""
