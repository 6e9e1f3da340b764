"""What a monitor shows: scalars to every logger, TensorBoard's layout, rendered pictures."""
