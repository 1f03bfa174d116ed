"""Host-side data code (numpy/PIL only, no jax): slicing, images, text, token layout."""
