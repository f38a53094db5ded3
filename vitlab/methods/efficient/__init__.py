"""Chapter 2, efficient inference: one module per paper (see notebooks/2_efficient/)."""
